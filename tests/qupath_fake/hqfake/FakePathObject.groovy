package hqfake

/** A QuPath 0.4 object: no getMetadata() (QuPath 0.4 drops the metadata of annotations and detections). */
class FakePathObject {
    Map feature
    String objectType
    String name
    String className
    FakeMeasurementList measurementList

    static FakePathObject fromFeature(Map feature, boolean metadata) {
        Map properties = (Map) (feature.properties ?: [:])
        def classification = properties.classification
        String className = classification instanceof Map ? (classification.name ?: classification.names?.join(': ')) : classification
        Map values = properties.measurements instanceof Map ? properties.measurements.collectEntries { k, v -> [k, v as float] } : [:]
        def fields = [feature: feature, objectType: properties.objectType ?: 'annotation', name: properties.name,
                      className: className, measurementList: new FakeMeasurementList(values: values)]
        if (!metadata) return new FakePathObject(fields)
        return new FakePathObjectWithMetadata(fields + [metadata: properties.metadata ?: [:]])
    }

    String getName() { name }
    FakePathClass getPathClass() { className == null ? null : qupath.lib.gui.scripting.QPEx.getPathClass(className) }
    boolean isAnnotation() { objectType == 'annotation' }
    boolean isDetection() { objectType in ['detection', 'tile', 'cell'] }
    boolean isTile() { objectType == 'tile' }
    boolean isCell() { objectType == 'cell' }
    FakeMeasurementList getMeasurementList() { measurementList }

    Map toMap() { [name: name, className: className, objectType: objectType, measurements: measurementList.values] }
}
