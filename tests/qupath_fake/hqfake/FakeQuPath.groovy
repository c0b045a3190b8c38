package hqfake

/**
 * A stand-in for the few QuPath 0.4-0.6 calls the HepatoQuant scripts make, so the scripts as shipped run in plain
 * Groovy (tests only). It records what the scripts did (objects, class colours, log lines, call order) for the
 * tests to check; it is not QuPath: geometry is carried, never interpreted, and resolveHierarchy() only records
 * that it ran. A scenario (JSON) sets the open image, the selection, the project and the QuPath version imitated
 * ("0.4": objects without getMetadata(), as QuPath 0.4 drops the metadata of annotations and detections).
 */
class FakeQuPath {
    static Map scenario
    static FakeImage image
    static FakeProject project
    static List<FakePathObject> selected = []
    static Map<String, FakePathClass> classes = [:]
    static List<Map> log = []
    static List<String> calls = []

    static void load(File file) {
        scenario = (Map) new com.google.gson.Gson().fromJson(file.getText('UTF-8'), Object)
        boolean metadata = scenario.qupath != '0.4'
        if (scenario.project) {
            project = new FakeProject(dir: new File(scenario.project.dir as String))
            scenario.project.entries.each { Map e ->
                project.entries << new FakeEntry(imageName: e.name, hierarchy: new FakeHierarchy(objects: objectsOf(e.objects, metadata)))
            }
        }
        if (scenario.image) {
            int index = (scenario.image.entry ?: -1) as int
            FakeEntry entry = index >= 0 ? project.entries[index] : null
            FakeHierarchy hierarchy = entry?.hierarchy ?: new FakeHierarchy(objects: objectsOf(scenario.image.objects, metadata))
            image = new FakeImage(uris: (scenario.image.uris as List).collect { new URI(it as String) },
                    name: scenario.image.name, hierarchy: hierarchy, entry: entry)
            selected = (scenario.image.selected ?: []).collect { hierarchy.objects[it as int] }
        }
    }

    static List<FakePathObject> objectsOf(Object features, boolean metadata) {
        return (features ?: []).collect { FakePathObject.fromFeature((Map) it, metadata) }
    }

    static List<FakePathObject> readGeoJson(String text) {
        Object json = new com.google.gson.Gson().fromJson(text, Object)
        List features = json instanceof List ? json : json.type == 'FeatureCollection' ? json.features : [json]
        return objectsOf(features, scenario.qupath != '0.4')
    }

    static void dump(File file) {
        Map out = [objects: image?.hierarchy?.objects?.collect { it.toMap() }, log: log, calls: calls,
                   classColours: classes.findAll { it.value.color != null }.collectEntries { [it.key, it.value.color] }]
        file.setText(new com.google.gson.GsonBuilder().serializeSpecialFloatingPointValues().create().toJson(out), 'UTF-8')
    }
}
