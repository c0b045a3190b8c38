package hqfake

class FakeMeasurementList {
    Map<String, Number> values = [:]

    Map<String, Number> asMap() { values }
    double get(String name) { values.containsKey(name) ? values[name] as double : Double.NaN }
    boolean containsKey(String name) { values.containsKey(name) }
}
