package hqfake

class FakeEntry {
    String imageName
    FakeHierarchy hierarchy

    FakeHierarchy readHierarchy() { hierarchy }
}
