/*
 * Drives HepatoQuantCore (the QuPath scripts' plain logic) outside QuPath, for the tests: the test concatenates this
 * file with qupath_scripts/core/HepatoQuantCore.groovy, exactly as the scripts embed it, and runs
 *     groovy -cp gson.jar calls.groovy CALLS.json OUT.json
 * CALLS.json is a list of calls; OUT.json the same list of {"value": ...} or {"error": {"code", "message"}}:
 *   {"static": "mapImagePath", "args": [...], "fileArgs": [0]}    any static method of HepatoQuantCore
 *                                                                 (fileArgs: arguments given as java.io.File;
 *                                                                 a File returned comes back as its path)
 *   {"api": {"url", "token", "timeout"}, "method": "serverInfo", "args": [...]}
 *   {"api": {...}, "analyse": {request}, "pollMillis": 50}       submit, wait (progress lines), result
 *   {"api": {...}, "interruptAfterRunning": {request}}           submit, wait in a thread, interrupt it once running
 *   {"api": {...}, "analyseThroughOutage": {request}, "unreachableCalls": 3, "reconnectMillis": 5000}
 *                                                                 submit, then the server "cannot be reached" for
 *                                                                 that many job polls (UNAVAILABLE), then wait
 */

def calls = new com.google.gson.Gson().fromJson(new File(args[0]).getText('UTF-8'), List)
def outcomes = calls.collect { Map call ->
    try {
        return [value: perform(call)]
    } catch (HepatoQuantCore.Problem problem) {
        return [error: [code: problem.code, message: problem.message]]
    }
}
new File(args[1]).setText(HepatoQuantCore.toJson(outcomes), 'UTF-8')

Object perform(Map call) {
    if (call.static) {
        List arguments = (call.args ?: []).withIndex().collect { value, int i -> i in (call.fileArgs ?: []).collect { it as int } ? new File(value as String) : value }
        def value = HepatoQuantCore."${call.static}"(*arguments)
        return value instanceof File ? value.path : value
    }
    def api = new HepatoQuantCore.Api(call.api.url, call.api.token, (call.api.timeout ?: 30) as int)
    if (call.method) return api."${call.method}"(*(call.args ?: []))
    if (call.analyse) {
        def lines = []
        def job = HepatoQuantCore.waitForJob(api, api.submit(call.analyse), (call.pollMillis ?: 50) as int) { lines << it }
        def result = api.result(job.jobId)
        return [progress: lines, job: job, geoJson: HepatoQuantCore.resultGeoJson(result),
                table: HepatoQuantCore.compositionTable(result), modelStatus: result.modelStatus]
    }
    if (call.analyseThroughOutage) {
        def unreachable = new java.util.concurrent.atomic.AtomicInteger(call.unreachableCalls as int)
        def flaky = new HepatoQuantCore.Api(call.api.url, call.api.token, 30) {
            @Override
            Map job(String jobId) {
                if (unreachable.getAndDecrement() > 0) throw new HepatoQuantCore.Problem('connection refused', 'UNAVAILABLE')
                return super.job(jobId)
            }
        }
        def lines = []
        def job = HepatoQuantCore.waitForJob(flaky, flaky.submit(call.analyseThroughOutage), 20,
                call.reconnectMillis as long) { lines << it }
        return [progress: lines, job: job]
    }
    if (call.interruptAfterRunning) {
        def job = api.submit(call.interruptAfterRunning)
        def outcome = [:]
        def waiter = Thread.start {
            try {
                HepatoQuantCore.waitForJob(api, job, 50) { }
            } catch (HepatoQuantCore.Problem problem) {
                outcome.error = [code: problem.code, message: problem.message]
            }
        }
        while (api.job(job.jobId).state != 'JOB_STATE_RUNNING') Thread.sleep(20)
        waiter.interrupt()
        waiter.join(30000)
        Map last = api.job(job.jobId)
        for (int i = 0; i < 200 && !(last.state in HepatoQuantCore.FINAL_STATES); i++) {
            Thread.sleep(50)
            last = api.job(job.jobId)
        }
        return outcome + [finalState: last.state]
    }
    throw new IllegalArgumentException("unknown call ${call}")
}

// The core follows (appended by the test).
