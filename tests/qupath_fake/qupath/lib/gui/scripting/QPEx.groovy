package qupath.lib.gui.scripting

import hqfake.FakeQuPath
import hqfake.FakePathClass

/** The QPEx static methods the HepatoQuant scripts call, backed by hqfake.FakeQuPath (tests only; not QuPath). */
class QPEx {
    static final String PROJECT_BASE_DIR = '{%PROJECT}'

    static getCurrentImageData() { FakeQuPath.image }
    static getCurrentServer() { FakeQuPath.image }
    static getCurrentHierarchy() { FakeQuPath.image.hierarchy }
    static getProject() { FakeQuPath.project }
    static getProjectEntry() { FakeQuPath.image?.entry }
    static List getSelectedObjects() { FakeQuPath.selected }
    static List getAnnotationObjects() { FakeQuPath.image.hierarchy.annotationObjects }
    static List getDetectionObjects() { FakeQuPath.image.hierarchy.detectionObjects }

    static void removeObjects(Collection objects, boolean keepChildren) {
        FakeQuPath.calls << "removeObjects(${objects.size()}, keepChildren=${keepChildren})".toString()
        Set gone = objects as Set
        FakeQuPath.image.hierarchy.objects.removeAll { it in gone }
    }

    static void addObjects(Collection objects) {
        FakeQuPath.calls << "addObjects(${objects.size()})".toString()
        FakeQuPath.image.hierarchy.objects.addAll(objects)
    }

    static void resolveHierarchy() { FakeQuPath.calls << 'resolveHierarchy' }

    static void fireHierarchyUpdate() { FakeQuPath.calls << 'fireHierarchyUpdate' }

    static FakePathClass getPathClass(String name) {
        if (!FakeQuPath.classes.containsKey(name)) FakeQuPath.classes[name] = new FakePathClass(name: name)
        return FakeQuPath.classes[name]
    }

    static String buildFilePath(String... parts) {
        List<String> resolved = parts.collect { it == PROJECT_BASE_DIR ? FakeQuPath.project.dir.path : it }
        return new File(resolved[0], resolved.drop(1).join(File.separator)).path
    }

    static void exportObjectsToGeoJson(Collection objects, String path, String... options) {
        FakeQuPath.calls << "exportObjectsToGeoJson(${objects.size()}, ${options.join(',')})".toString()
        def collection = [type: 'FeatureCollection', features: objects.collect { it.feature }]
        new File(path).setText(new com.google.gson.Gson().toJson(collection), 'UTF-8')
    }
}
