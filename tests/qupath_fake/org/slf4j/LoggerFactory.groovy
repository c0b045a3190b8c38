package org.slf4j

import hqfake.FakeQuPath

/** slf4j's LoggerFactory for the fake QuPath (tests only): records each line with its level. */
class LoggerFactory {
    static FakeLogger getLogger(String name) { new FakeLogger() }
}

class FakeLogger {
    void info(String message) { record('INFO', message) }
    void warn(String message) { record('WARN', message) }
    void error(String message) { record('ERROR', message) }
    void error(String message, Throwable error) { record('ERROR', message + ' ' + error) }

    private static void record(String level, String message) {
        FakeQuPath.log << [level: level, message: message]
        System.out.println(level + ': ' + message)
    }
}
