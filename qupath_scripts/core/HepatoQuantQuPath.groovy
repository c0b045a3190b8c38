// The QuPath side shared by the HepatoQuant scripts: the few calls into QuPath (0.4 to 0.6), nothing decided here.
// Each script carries a copy of this file (see scripts/embed_qupath_core.py); edit qupath_scripts/core/.

/** The open image's name for messages: the project's name for it, else the server's. */
String currentImageLabel(imageData) {
    if (imageData == null) return 'no image'
    return getProjectEntry()?.getImageName() ?: imageData.getServer().getMetadata().getName()
}

/** What the plain logic needs to know about a QuPath object (metadata only where this QuPath keeps it). */
Map plainView(pathObject) {
    def type = pathObject.isAnnotation() ? 'annotation' : pathObject.isTile() ? 'tile' :
            pathObject.isCell() ? 'cell' : pathObject.isDetection() ? 'detection' : 'other'
    def metadata = pathObject.metaClass.respondsTo(pathObject, 'getMetadata') ? pathObject.getMetadata() : [:]
    return [name: pathObject.getName(), className: pathObject.getPathClass()?.toString(), objectType: type,
            metadata: metadata ?: [:]]
}

/**
 * Replaces this image's HepatoQuant objects with those of a result file (geoJson: its text). Reads the new objects
 * first, so a file QuPath cannot read changes nothing; then removes only HepatoQuant's earlier objects (keeping any
 * of yours nested under them), adds the new ones, nests tiles under their regions and sets the class colours
 * (a failure there is only logged: the objects are in, and QuPath shows them in their GeoJSON colours).
 * Returns [added, removed].
 */
List<Integer> replaceHepatoQuantObjects(File file, String geoJson, logger) {
    def newObjects
    try {
        newObjects = PathIO.readObjects(file)
    } catch (Exception e) {
        throw new HepatoQuantCore.Problem("QuPath could not read ${file.name} (${e.message}); nothing was imported")
    }
    def previous = ((getAnnotationObjects() + getDetectionObjects()) as List).findAll {
        HepatoQuantCore.isHepatoQuantObject(plainView(it))
    }
    removeObjects(previous, true)
    addObjects(newObjects)
    resolveHierarchy()
    try {  // cosmetic: the objects already carry these colours, but QuPath keeps a class's first colour
        HepatoQuantCore.classColours(geoJson, file.name).each { name, rgb ->
            getPathClass(name).setColor(HepatoQuantCore.packRgb(rgb))
        }
    } catch (Exception e) {
        logger.warn("HepatoQuant: the objects are imported, but their class colours could not be set (${e})")
    }
    fireHierarchyUpdate()
    return [newObjects.size(), previous.size()]
}
