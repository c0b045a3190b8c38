package hqfake

class FakeProject {
    File dir
    List<FakeEntry> entries = []

    List<FakeEntry> getImageList() { entries }
}
