package hqfake

class FakeHierarchy {
    List<FakePathObject> objects = []

    List<FakePathObject> getAnnotationObjects() { objects.findAll { it.isAnnotation() } }
    List<FakePathObject> getDetectionObjects() { objects.findAll { it.isDetection() } }
}
