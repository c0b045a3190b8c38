package hqfake

class FakePathClass {
    String name
    Integer color

    void setColor(Integer rgb) { color = rgb }
    String toString() { name }
}
