package hqfake

/** A QuPath 0.5 / 0.6 object, whose metadata survives GeoJSON import. */
class FakePathObjectWithMetadata extends FakePathObject {
    Map<String, String> metadata = [:]

    Map<String, String> getMetadata() { metadata }

    Map toMap() { super.toMap() + [metadata: metadata] }
}
