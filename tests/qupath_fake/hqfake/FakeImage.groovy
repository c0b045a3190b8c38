package hqfake

class FakeImage {
    List<URI> uris
    String name
    FakeHierarchy hierarchy
    FakeEntry entry

    FakeImage getServer() { this }
    List<URI> getURIs() { uris }
    FakeImage getMetadata() { this }
    String getName() { name }
}
