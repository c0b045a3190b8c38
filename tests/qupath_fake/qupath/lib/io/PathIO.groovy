package qupath.lib.io

import hqfake.FakeQuPath

/** PathIO.readObjects for the fake QuPath (tests only): the file's objects, not yet in any hierarchy. */
class PathIO {
    static List readObjects(File file) {
        if (!(file.name.endsWith('.geojson') || file.name.endsWith('.json'))) return []  // as QuPath: zero objects
        FakeQuPath.calls << 'readObjects'
        return FakeQuPath.readGeoJson(file)
    }
}
