package qupath.lib.io

import hqfake.FakeQuPath

/**
 * PathIO.readObjects for the fake QuPath (tests only): the file's objects, not yet in any hierarchy. As QuPath:
 * .geojson / .json, also gzip-compressed (.gz) or zipped (.zip); any other name gives zero objects.
 */
class PathIO {
    static List readObjects(File file) {
        FakeQuPath.calls << 'readObjects'
        String name = file.name.replaceAll(/\.(gz|zip)$/, '')
        if (!(name.endsWith('.geojson') || name.endsWith('.json'))) return []
        InputStream input = new FileInputStream(file)
        try {
            if (file.name.endsWith('.gz')) input = new java.util.zip.GZIPInputStream(input)
            if (file.name.endsWith('.zip')) {
                input = new java.util.zip.ZipInputStream(input)
                input.nextEntry
            }
            return FakeQuPath.readGeoJson(input.getText('UTF-8'))
        } finally {
            input.close()
        }
    }
}
