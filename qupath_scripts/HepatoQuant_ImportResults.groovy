/*
 * HepatoQuant_ImportResults.groovy: import this image's HepatoQuant results from a folder (research use only).
 *
 * For sites where the analysis runs elsewhere (`hepatoquant analyze`, the Python client, another lab): finds
 * "<slide file name without extension>.geojson" (or .json, .geojson.gz, ...) in RESULTS_FOLDER and replaces this
 * image's HepatoQuant objects with it, by the same rules as HepatoQuant_Analyze.groovy: your own annotations are
 * never touched, tiles nest under their regions, class colours are set, and the log shows each region's
 * composition. Works with Run > Run for project.
 *
 * QuPath 0.4, 0.5 and 0.6; needs nothing but QuPath. Setup and walkthrough: qupath_scripts/README.md.
 */

import static qupath.lib.gui.scripting.QPEx.*

import org.slf4j.LoggerFactory
import qupath.lib.io.PathIO

// ---- Settings -----------------------------------------------------------------------------------------------
// The folder holding the results (the --out folder of `hepatoquant analyze`, or the client's output folder).
def RESULTS_FOLDER = 'C:/HepatoQuant/results'
// ---- End of settings ----------------------------------------------------------------------------------------

def logger = LoggerFactory.getLogger('HepatoQuant')
def imageData = getCurrentImageData()
def imageLabel = currentImageLabel(imageData)
try {
    if (imageData == null) {
        throw new HepatoQuantCore.Problem('no image is open; open a slide (or use Run > Run for project) and run the script again')
    }
    def uri = HepatoQuantCore.singleImageUri(getCurrentServer().getURIs(), imageLabel)
    def stems = HepatoQuantCore.resultStems(HepatoQuantCore.uriToPath(uri), getProjectEntry()?.getImageName())
    def file = HepatoQuantCore.findResultFile(new File(RESULTS_FOLDER), stems, imageLabel)
    def text = HepatoQuantCore.readResultText(file)
    HepatoQuantCore.checkAllHepatoQuant(text, file.toString())
    def table = HepatoQuantCore.compositionTable(HepatoQuantCore.compositionFromGeoJson(text, file.toString()))
    def counts = replaceHepatoQuantObjects(file, text, logger)
    logger.info("HepatoQuant: ${imageLabel}: imported ${counts[0]} objects from ${file}, replacing ${counts[1]} " +
            "earlier HepatoQuant objects. % of each region's classified tiles:\n" + table)
} catch (HepatoQuantCore.Problem problem) {
    logger.error("HepatoQuant: ${imageLabel}: ${problem.message}. This image's objects were not changed.")
} catch (Exception e) {
    logger.error("HepatoQuant: ${imageLabel}: unexpected error (${e}); please report it with this log", e)
}

// ---- BEGIN HEPATOQUANT QUPATH LAYER (a copy of qupath_scripts/core/HepatoQuantQuPath.groovy: edit that file) -
// The QuPath side shared by the HepatoQuant scripts: the few calls into QuPath (0.4 to 0.6), nothing decided here.
// Each script carries a copy of this file (see scripts/embed_qupath_core.py); edit qupath_scripts/core/.

/** The open image's name for messages: the project's name for it, else the server's. */
String currentImageLabel(imageData) {
    if (imageData == null) return 'no image'
    return getProjectEntry()?.getImageName() ?: imageData.getServer().getMetadata().getName()
}

/** What the plain logic needs to know about a QuPath object (metadata only where this QuPath keeps it). */
Map plainView(pathObject) {
    def type = pathObject.isAnnotation() ? 'annotation' : pathObject.isTile() ? 'tile' :
            pathObject.isCell() ? 'cell' : pathObject.isDetection() ? 'detection' : 'other'
    def metadata = pathObject.metaClass.respondsTo(pathObject, 'getMetadata') ? pathObject.getMetadata() : [:]
    return [name: pathObject.getName(), className: pathObject.getPathClass()?.toString(), objectType: type,
            metadata: metadata ?: [:]]
}

/**
 * Replaces this image's HepatoQuant objects with those of a result file (geoJson: its text). Reads the new objects
 * first, so a file QuPath cannot read changes nothing; then removes only HepatoQuant's earlier objects (keeping any
 * of yours nested under them), adds the new ones, nests tiles under their regions and sets the class colours
 * (a failure there is only logged: the objects are in, and QuPath shows them in their GeoJSON colours).
 * Returns [added, removed].
 */
List<Integer> replaceHepatoQuantObjects(File file, String geoJson, logger) {
    def newObjects
    try {
        newObjects = PathIO.readObjects(file)
    } catch (Exception e) {
        throw new HepatoQuantCore.Problem("QuPath could not read ${file.name} (${e.message}); nothing was imported")
    }
    def previous = ((getAnnotationObjects() + getDetectionObjects()) as List).findAll {
        HepatoQuantCore.isHepatoQuantObject(plainView(it))
    }
    removeObjects(previous, true)
    addObjects(newObjects)
    resolveHierarchy()
    try {  // cosmetic: the objects already carry these colours, but QuPath keeps a class's first colour
        HepatoQuantCore.classColours(geoJson, file.name).each { name, rgb ->
            getPathClass(name).setColor(HepatoQuantCore.packRgb(rgb))
        }
    } catch (Exception e) {
        logger.warn("HepatoQuant: the objects are imported, but their class colours could not be set (${e})")
    }
    fireHierarchyUpdate()
    return [newObjects.size(), previous.size()]
}
// ---- END HEPATOQUANT QUPATH LAYER ---------------------------------------------------------------------------

// ---- BEGIN HEPATOQUANT CORE (a copy of qupath_scripts/core/HepatoQuantCore.groovy: edit that file) ----------
/**
 * HepatoQuant's plain logic for the QuPath scripts: the HTTP/JSON calls to the server, JSON handling, path
 * mapping, which objects are HepatoQuant's, result files and tables (research use only).
 *
 * This file is the one source of this code. Every HepatoQuant_*.groovy script carries a verbatim copy between
 * its "BEGIN HEPATOQUANT CORE" and "END HEPATOQUANT CORE" lines, so a pathologist copies one file per script and
 * needs nothing else; `python scripts/embed_qupath_core.py` refreshes the copies and a test fails when one is stale.
 *
 * It uses only what QuPath 0.4 to 0.6 ship (Java 17's HttpClient, Gson) and no QuPath class, so it runs in plain
 * Groovy, where the tests drive it against a live server. It is written in the Groovy that both Groovy 2.4 (the
 * tests) and Groovy 4 (QuPath) accept, and uses fully qualified names so that it needs no import lines.
 */
class HepatoQuantCore {

    /** Marker every HepatoQuant object carries in its metadata (same as hepatoquant_client.hepatoquant_objects). */
    static final String METADATA_KEY = 'hepatoquant'
    /** Name prefix of HepatoQuant's region annotations. */
    static final String REGION_NAME_PREFIX = 'HepatoQuant: '
    /** Classification names of HepatoQuant's objects start with this ("HQ Tumour", "HQ Tumour region", ...). */
    static final String CLASS_NAME_PREFIX = 'HQ '
    /** Region measurements written by the server (see hepatoquant_client.hepatoquant_objects). */
    static final String REGION_AREA_MEASUREMENT = 'HQ region area mm^2'
    static final String TILE_COUNT_MEASUREMENT = 'HQ tiles'
    static final String TILE_AREA_MEASUREMENT = 'HQ tile area mm^2'
    /** Result files QuPath imports (it imports nothing from any other extension). */
    static final List<String> RESULT_SUFFIXES = ['.geojson', '.json', '.geojson.gz', '.json.gz', '.geojson.zip']

    static final String FINAL_SUCCEEDED = 'JOB_STATE_SUCCEEDED'
    static final List<String> FINAL_STATES = ['JOB_STATE_SUCCEEDED', 'JOB_STATE_FAILED', 'JOB_STATE_CANCELLED',
                                              'JOB_STATE_INTERRUPTED']

    /** A failure the user can fix: its message names the input and says what to change. Nothing was modified. */
    static class Problem extends RuntimeException {
        final String code

        Problem(String message, String code = 'HEPATOQUANT') {
            super(message)
            this.code = code
        }
    }

    // ------------------------------------------------------------------------------------------------------------
    // JSON (Gson: QuPath ships it; no JsonSlurper there)

    static Object parseJson(String text, String what) {
        try {
            return new com.google.gson.Gson().fromJson(text, Object)
        } catch (com.google.gson.JsonParseException e) {
            throw new Problem("${what} is not valid JSON (${e.message}); " +
                    'check that it is a GeoJSON or JSON file written by HepatoQuant or QuPath', 'INVALID_ARGUMENT')
        }
    }

    static String toJson(Object value) {
        return new com.google.gson.GsonBuilder().disableHtmlEscaping().create().toJson(value)
    }

    /** A proto3-JSON number: int64 fields arrive as strings, absent fields mean 0. */
    static long asLong(Object value) {
        if (value == null) return 0L
        if (value instanceof Number) return ((Number) value).longValue()
        return Long.parseLong(value.toString())
    }

    static double asDouble(Object value) {
        if (value == null) return 0d
        if (value instanceof Number) return ((Number) value).doubleValue()
        return Double.parseDouble(value.toString())
    }

    // ------------------------------------------------------------------------------------------------------------
    // The server's HTTP/JSON gateway: POST /v1/<Method> with proto3 JSON, errors as {"code", "message"}

    static class Api {
        final String baseUrl
        final String token
        final int timeoutSeconds
        final java.net.http.HttpClient http

        Api(String serverUrl, String token, int timeoutSeconds = 60) {
            this.baseUrl = HepatoQuantCore.checkedServerUrl(serverUrl)  // qualified: a subclass can call it
            this.token = token == null ? '' : token.trim()
            this.timeoutSeconds = timeoutSeconds
            this.http = java.net.http.HttpClient.newBuilder()
                    .version(java.net.http.HttpClient.Version.HTTP_1_1)
                    .connectTimeout(java.time.Duration.ofSeconds(Math.min(timeoutSeconds, 15)))
                    .build()
        }

        Map serverInfo() { return call('GetServerInfo', [:]) }

        Map submit(Map request) { return call('SubmitAnalysis', request) }

        Map job(String jobId) { return call('GetJob', [job_id: jobId]) }

        Map cancel(String jobId) { return call('CancelJob', [job_id: jobId]) }

        Map result(String jobId) { return call('GetResult', [job_id: jobId]) }

        /** One RPC through the gateway; every failure becomes a Problem that says what to change. */
        Map call(String method, Map body) {
            def builder = java.net.http.HttpRequest.newBuilder(URI.create(baseUrl + '/v1/' + method))
                    .timeout(java.time.Duration.ofSeconds(timeoutSeconds))
                    .header('Content-Type', 'application/json')
                    .POST(java.net.http.HttpRequest.BodyPublishers.ofString(HepatoQuantCore.toJson(body),
                            java.nio.charset.StandardCharsets.UTF_8))
            if (token) builder.header('Authorization', 'Bearer ' + token)
            def response
            try {
                response = http.send(builder.build(), java.net.http.HttpResponse.BodyHandlers.ofString(
                        java.nio.charset.StandardCharsets.UTF_8))
            } catch (java.net.http.HttpTimeoutException e) {
                throw new Problem("the HepatoQuant server at ${baseUrl} did not answer ${method} within " +
                        "${timeoutSeconds} s; check that it is running and not overloaded, or raise TIMEOUT_SECONDS",
                        'UNAVAILABLE')
            } catch (ConnectException e) {
                throw new Problem("cannot reach the HepatoQuant server at ${baseUrl} (${e.message ?: e.class.simpleName}); " +
                        'start it (hepatoquant serve) or set SERVER_URL at the top of this script to its HTTP ' +
                        'address (default port 8080)', 'UNAVAILABLE')
            } catch (IOException e) {
                throw new Problem("the connection to the HepatoQuant server at ${baseUrl} failed during ${method} " +
                        "(${e.class.simpleName}: ${e.message}); check SERVER_URL (the HTTP gateway, default port " +
                        '8080, not the gRPC port 50051) and the network', 'UNAVAILABLE')
            }
            return decodeResponse(method, response.statusCode(), response.body())
        }

        Map decodeResponse(String method, int status, String text) {
            Object json
            try {
                json = new com.google.gson.Gson().fromJson(text, Object)
            } catch (com.google.gson.JsonParseException e) {
                json = null
            }
            if (!(json instanceof Map)) {
                throw new Problem("${baseUrl} answered ${method} with HTTP ${status} and no HepatoQuant JSON; " +
                        'check that SERVER_URL is the HepatoQuant HTTP gateway (default port 8080)', 'UNAVAILABLE')
            }
            Map map = (Map) json
            if (status == 200) return map
            String code = map.code ?: "HTTP_${status}"
            String message = map.message ?: text
            throw new Problem(errorText(method, code, message), code)
        }

        String errorText(String method, String code, String message) {
            switch (code) {
                case 'UNAUTHENTICATED':
                    return "the HepatoQuant server at ${baseUrl} refused the token (${message}); set TOKEN at the " +
                            "top of this script to the server's token (ask whoever runs the server)"
                case 'PERMISSION_DENIED':
                    return "the server refused the slide: ${message}. Set PATH_MAPPINGS at the top of this script " +
                            "so that this image's folder maps to the same folder as the server sees it"
                case 'NOT_FOUND':
                    return "the server answered ${method} with NOT_FOUND: ${message}" + (method == 'SubmitAnalysis' ?
                            '. If the slide exists, check PATH_MAPPINGS at the top of this script' : '')
                case 'RESOURCE_EXHAUSTED':
                    return "the server is busy (${message}); run the script again in a few minutes"
                default:
                    return "the server answered ${method} with ${code}: ${message}"
            }
        }
    }

    static String checkedServerUrl(String serverUrl) {
        String url = (serverUrl ?: '').trim()
        while (url.endsWith('/')) url = url.substring(0, url.length() - 1)
        URI parsed
        try {
            parsed = new URI(url)
        } catch (URISyntaxException e) {
            parsed = null
        }
        if (parsed == null || !(parsed.scheme in ['http', 'https']) || !parsed.host) {
            throw new Problem("SERVER_URL '${serverUrl}' is not an http:// or https:// address; set it at the top " +
                    'of this script, e.g. http://localhost:8080', 'INVALID_ARGUMENT')
        }
        return url
    }

    // ------------------------------------------------------------------------------------------------------------
    // Jobs: submit, progress, result

    /** Script setting -> AnalysisRequest field, for the numbers and words a pathologist may set (null = not
     *  given: the server's or the pack's default). A value given, 0 included, is sent and checked there. */
    static final Map<String, String> REQUEST_FIELDS = [
            model: 'model', segmenterModel: 'segmenter_model', mppUmPx: 'mpp_um_px', tileSizePx: 'tile_size_px',
            tileSpacingUmPx: 'tile_spacing_um_px', minTissueFraction: 'min_tissue_fraction',
            tissueThreshold: 'tissue_threshold', windowOverlap: 'window_overlap', minFocus: 'min_focus',
            tileObjectType: 'tile_object_type', precision: 'precision', embeddingsFormat: 'embeddings_format']

    /** The AnalysisRequest (proto3 JSON) for the slide at serverPath with the script's settings. */
    static Map analysisRequest(String serverPath, Map settings, String regionsGeoJson) {
        Map request = [slide: serverPath]
        REQUEST_FIELDS.each { String setting, String field ->
            def value = settings[setting]
            if (value != null && value != '') request[field] = value
        }
        if (settings.containsKey('importTiles') && !settings.importTiles) request.omit_tiles = true
        if (settings.keepArtefacts) request.keep_artefacts = true
        if (settings.includeEmbeddings) request.include_embeddings = true
        if (settings.tumourClassNames) request.tumour_class_names = settings.tumourClassNames as List
        if (regionsGeoJson) request.regions_geojson = regionsGeoJson
        return request
    }

    /** Stage, counts, rate and time left of a Job, for the log ("tiles 120/480 (25%), 35.2 tiles/s, ~10 s left"). */
    static String progressText(Map job) {
        Map progress = (Map) (job.progress ?: [:])
        String stage = progress.stage ?: stateName(job)
        long done = asLong(progress.done)
        long total = asLong(progress.total)
        StringBuilder text = new StringBuilder(stage)
        if (total > 0) text.append(" ${done}/${total} (${Math.round(100d * done / total)}%)")
        double rate = asDouble(progress.itemsPerSecond)
        if (rate > 0 && stage in ['tiles', 'windows']) text.append(String.format(Locale.ROOT, ', %.1f %s/s', rate, stage))
        double eta = asDouble(progress.etaSeconds)
        if (eta > 0) text.append(", about ${Math.round(eta)} s left")
        return text.toString()
    }

    static String stateName(Map job) {
        return ((job.state ?: 'JOB_STATE_UNSPECIFIED') as String).replace('JOB_STATE_', '').toLowerCase()
    }

    /**
     * Polls the job until it ends, calling onProgress(text) when the stage changes, at every further 10 %, and at
     * least every 30 s. Returns the succeeded job; a failed, cancelled or interrupted job is a Problem. If this
     * thread is interrupted (QuPath's "Kill running script"), the job is cancelled on the server first.
     */
    static Map waitForJob(Api api, Map job, int pollMillis, Closure onProgress) {
        return waitForJob(api, job, pollMillis, RECONNECT_MILLIS, onProgress)
    }

    /** How long waitForJob keeps asking a server it cannot reach: a restart with its models takes 20 s or more. */
    static final long RECONNECT_MILLIS = 180000

    static Map waitForJob(Api api, Map job, int pollMillis, long reconnectMillis, Closure onProgress) {
        String jobId = job.jobId
        String lastStage = null
        long lastDecile = -1
        long lastLogAt = 0
        while (!(job.state in FINAL_STATES)) {
            Map progress = (Map) (job.progress ?: [:])
            String stage = progress.stage ?: stateName(job)
            long total = asLong(progress.total)
            long decile = total > 0 ? (long) (10 * asLong(progress.done) / total) : -1
            long now = System.currentTimeMillis()
            if (stage != lastStage || decile > lastDecile || now - lastLogAt >= 30000) {
                onProgress(progressText(job))
                lastStage = stage
                lastDecile = decile
                lastLogAt = now
            }
            try {
                Thread.sleep(pollMillis)
            } catch (InterruptedException e) {
                api.cancel(jobId)
                Thread.currentThread().interrupt()
                throw new Problem("stopped: job ${jobId} was cancelled on the server; nothing was imported", 'CANCELLED')
            }
            job = askAgain(api, jobId, reconnectMillis, onProgress)
        }
        return finishedJob(job)
    }

    /**
     * The job as the server has it now. While the server cannot be reached (UNAVAILABLE: restarting, a dropped
     * connection) it is asked again, waiting 0.5 s doubling to 10 s, for reconnectMillis in all, and onProgress
     * says so at every wait; other problems, and the last UNAVAILABLE, are thrown.
     */
    static Map askAgain(Api api, String jobId, long reconnectMillis, Closure onProgress) {
        long giveUpAt = System.currentTimeMillis() + reconnectMillis
        long waitMillis = 500
        while (true) {
            try {
                return api.job(jobId)
            } catch (Problem problem) {
                long left = giveUpAt - System.currentTimeMillis()
                if (problem.code != 'UNAVAILABLE' || left <= 0) throw problem
                long wait = Math.min(waitMillis, left)
                onProgress(("server unreachable (${problem.message}); asking again in ${wait} ms, for " +
                        "${(long) (left / 1000)} s more") as String)
                try {
                    Thread.sleep(wait)
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt()
                    throw new Problem("stopped while the server was unreachable: job ${jobId} may still run there; " +
                            'cancel it from the server once it is back', 'CANCELLED')
                }
                waitMillis = Math.min(waitMillis * 2, 10000)
            }
        }
    }

    static Map finishedJob(Map job) {
        switch (job.state) {
            case FINAL_SUCCEEDED:
                return job
            case 'JOB_STATE_FAILED':
                throw new Problem("the analysis failed on the server (${job.errorCode ?: 'UNKNOWN'}): " +
                        "${job.errorMessage ?: 'no message'}", (job.errorCode ?: 'UNKNOWN') as String)
            case 'JOB_STATE_CANCELLED':
                throw new Problem("job ${job.jobId} was cancelled on the server; run the script again to analyse " +
                        'this image', 'CANCELLED')
            default:
                throw new Problem("the server stopped while job ${job.jobId} ran; run the script again (the " +
                        'server reruns it)', 'ABORTED')
        }
    }

    /** The QuPath GeoJSON of an AnalysisResult (bytes travel base64-encoded in proto3 JSON). */
    static String resultGeoJson(Map result) {
        if (!result.qupathGeojson) {
            throw new Problem("the result of job ${result.jobId} has no QuPath GeoJSON; the server is too old " +
                    'or broken: update it', 'DATA_LOSS')
        }
        return new String(Base64.decoder.decode(result.qupathGeojson as String), java.nio.charset.StandardCharsets.UTF_8)
    }

    /** Writes text to a new file that QuPath's importer accepts (its name must end in .geojson). */
    static File temporaryGeoJson(String text, String label) {
        File file = File.createTempFile('hepatoquant-' + label.replaceAll('[^A-Za-z0-9_-]', '_') + '-', '.geojson')
        file.deleteOnExit()
        file.setText(text, 'UTF-8')
        return file
    }

    /**
     * The composition of each region (AnalysisResult.regions), then of each region class (all tumour, all
     * non-tumour, and the tiles outside every region), as a plain-text table for QuPath's log. A region without
     * tiles has no percentages (the server leaves them unset: no data is not 0 %): its cells stay blank.
     */
    static String compositionTable(Map result) {
        List<Map> regions = (List<Map>) (result.regions ?: [])
        List<Map> totals = ((List<Map>) (result.regionClasses ?: [])).collect { Map total ->
            total + [name: total.regionClass == 'unassigned' ? 'Outside regions' : "All ${total.regionClass}".toString()]
        }
        List<String> codes = []
        (regions + totals).each { region -> (region.classes ?: []).each { share -> if (!(share.code in codes)) codes << share.code } }
        List<String> header = ['Region', 'Class', 'Area mm2', 'Tiles'] + codes.collect { "${it} %".toString() }
        List<List<String>> rows = [header]
        boolean blanks = false
        (regions + totals).each { region ->
            Map percents = [:]
            (region.classes ?: []).each { share -> if (share.percent != null) percents[share.code] = asDouble(share.percent) }
            boolean hasArea = region.regionClass != 'unassigned'
            List<String> row = [region.name ?: '', region.regionClass ?: '',
                                hasArea ? String.format(Locale.ROOT, '%.3f', asDouble(region.regionAreaMm2)) : '',
                                Long.toString(asLong(region.tileCount))]
            codes.each { code ->
                if (percents.containsKey(code)) {
                    row << String.format(Locale.ROOT, '%.1f', percents[code] as double)
                } else {
                    row << ''
                    blanks = true
                }
            }
            rows << row
        }
        List<Integer> widths = header.indices.collect { i -> rows.collect { it[i].length() }.max() }
        String table = rows.collect { row ->
            row.indices.collect { i -> i < 2 ? row[i].padRight(widths[i]) : row[i].padLeft(widths[i]) }.join('  ').replaceAll(' +$', '')
        }.join('\n')
        return blanks ? table + '\n(blank %: the region has no classified tiles, so no composition; not 0 %)' : table
    }

    /**
     * The regions of a HepatoQuant result file (QuPath GeoJSON: its region annotations' measurements), in the form
     * compositionTable takes: what an import logs. Percentages absent from a region (no tiles) stay absent.
     */
    static Map compositionFromGeoJson(String geoJson, String source) {
        List<Map> regions = []
        topLevelFeatures(parseJson(geoJson, source), source).each { feature ->
            Map properties = feature instanceof Map ? (Map) (feature.properties ?: [:]) : [:]
            def classification = properties.classification
            String className = classification instanceof Map ? classification.name : classification
            Map measurements = properties.measurements instanceof Map ? (Map) properties.measurements : [:]
            Map object = [name: properties.name, metadata: properties.metadata ?: [:],
                          objectType: (properties.objectType ?: 'annotation'), className: className]
            if (object.objectType != 'annotation' || !isHepatoQuantObject(object) ||
                    !measurements.containsKey(TILE_COUNT_MEASUREMENT)) return
            List<Map> classes = []
            measurements.each { String name, value ->
                def tiles = name =~ /^([A-Z]{3}) tiles$/
                if (tiles.matches()) {
                    String code = tiles.group(1)
                    classes << [code: code, percent: measurements[code + ' %']]
                }
            }
            regions << [name: ((properties.name ?: '') as String) - REGION_NAME_PREFIX,
                        regionClass: ((className ?: '') as String) - CLASS_NAME_PREFIX,
                        regionAreaMm2: measurements[REGION_AREA_MEASUREMENT],
                        tileCount: measurements[TILE_COUNT_MEASUREMENT], classes: classes]
        }
        return [regions: regions]
    }

    // ------------------------------------------------------------------------------------------------------------
    // Paths: the image's URI on this machine -> the slide's path on the server (same rules as the Python client)

    private static final java.util.regex.Pattern DRIVE = java.util.regex.Pattern.compile('^/?([A-Za-z]):(/|$)')

    /** The file path of a file: URI or a plain path, with / separators ("file:/C:/x" -> "C:/x"). */
    static String uriToPath(String uri) {
        String text = uri.trim()
        if (DRIVE.matcher(text).find() || (!text.contains('://') && !text.toLowerCase().startsWith('file:'))) {
            return normalPath(text)
        }
        URI parsed
        try {
            parsed = new URI(text)
        } catch (URISyntaxException e) {
            throw new Problem("image URI '${uri}' is not a valid URI (${e.message})", 'INVALID_ARGUMENT')
        }
        if (parsed.scheme?.toLowerCase() != 'file') {
            throw new Problem("image URI '${uri}' is not a file URI (${parsed.scheme}:); only images stored as " +
                    'files can be sent to the server, by path', 'INVALID_ARGUMENT')
        }
        String path = parsed.path
        String host = parsed.authority
        if (host && host.toLowerCase() != 'localhost') path = '//' + host + path
        return normalPath(path)
    }

    private static String normalPath(String path) {
        String result = path.replace('\\', '/')
        def match = DRIVE.matcher(result)
        if (match.find()) result = match.group(1).toUpperCase() + ':/' + result.substring(match.end())
        return result
    }

    private static String prefixKey(String path) {
        String normal = normalPath(path)
        String stripped = normal.replaceAll('/+$', '')
        return (!stripped || stripped ==~ /[A-Z]:/) ? normal : stripped
    }

    private static boolean isWindowsPath(String path) {
        return DRIVE.matcher(path).find() || path.startsWith('//')
    }

    /**
     * The server's path for the image at uri: the longest mapped prefix (whole path components; case-insensitive
     * for Windows paths) replaced by its target. No mappings: the path as it is (server on this computer).
     */
    static String mapImagePath(String uri, Map<String, String> mappings) {
        String path = uriToPath(uri)
        if (!mappings) return path
        String bestPrefix = null
        String bestTarget = null
        String bestRest = null
        mappings.each { String from, String to ->
            if (!from?.trim() || !to?.trim()) {
                throw new Problem("PATH_MAPPINGS entry '${from}': '${to}' needs both sides; write e.g. " +
                        "'C:/slides': '/data/slides'", 'INVALID_ARGUMENT')
            }
            String prefix = prefixKey(uriToPath(from.trim()))
            boolean windows = isWindowsPath(path)
            String foldedPath = windows ? path.toLowerCase() : path
            String foldedPrefix = windows ? prefix.toLowerCase() : prefix
            String rest
            if (foldedPath == foldedPrefix) {
                rest = ''
            } else if (foldedPath.startsWith(foldedPrefix.endsWith('/') ? foldedPrefix : foldedPrefix + '/')) {
                rest = path.substring(prefix.length()).replaceAll('^/+', '')
            } else {
                return
            }
            if (bestPrefix == null || prefix.length() > bestPrefix.length()) {
                bestPrefix = prefix
                bestTarget = to.trim()
                bestRest = rest
            }
        }
        if (bestPrefix == null) {
            String configured = mappings.keySet().collect { "'${it}'" }.join(', ')
            throw new Problem("image '${uri}' (path '${path}') lies under none of the PATH_MAPPINGS folders " +
                    "(${configured}); add a mapping whose left side starts this path and whose right side is the " +
                    'same folder as the server sees it', 'INVALID_ARGUMENT')
        }
        String target = isWindowsPath(bestTarget) ? bestTarget.replace('\\', '/') : bestTarget
        if (!bestRest) return target
        String base = target.replaceAll('/+$', '')
        return base ? base + '/' + bestRest : '/' + bestRest
    }

    /** The one file URI of an image; images made of several files cannot be sent by path. */
    static String singleImageUri(Collection uris, String imageName) {
        List<String> texts = (uris ?: []).collect { it.toString() }
        if (texts.size() != 1) {
            throw new Problem("image '${imageName}' is made of ${texts.size()} files (${texts.join(', ')}); " +
                    'HepatoQuant analyses single-file whole-slide images: open the slide file itself', 'INVALID_ARGUMENT')
        }
        return texts[0]
    }

    // ------------------------------------------------------------------------------------------------------------
    // Objects: which are HepatoQuant's (a re-run replaces only those), which are regions, which are exported

    /**
     * True for objects HepatoQuant wrote: metadata marker, region name prefix, or a detection/tile whose class is
     * one of HepatoQuant's ("HQ ..."), for QuPath versions that do not keep metadata on detections.
     */
    static boolean isHepatoQuantObject(Map object) {
        Map metadata = (Map) (object.metadata ?: [:])
        if (metadata.containsKey(METADATA_KEY)) return true
        if (((object.name ?: '') as String).startsWith(REGION_NAME_PREFIX)) return true
        return object.objectType in ['detection', 'tile'] &&
                ((object.className ?: '') as String).startsWith(CLASS_NAME_PREFIX)
    }

    /** The annotations a pathologist selected to analyse as regions: not HepatoQuant's, not Ignore*-like. */
    static List<Integer> regionAnnotationIndices(List<Map> objects) {
        return selectedIndices(objects) { Map o ->
            o.objectType == 'annotation' && !isHepatoQuantObject(o) && !((o.className ?: '') as String).endsWith('*')
        }
    }

    /** Annotations to export for training or as regions: of the given classes (all classes when empty). */
    static List<Integer> exportIndices(List<Map> objects, Collection<String> classNames) {
        Set<String> wanted = (classNames ?: []).collect { it.toLowerCase() } as Set
        return selectedIndices(objects) { Map o ->
            o.objectType == 'annotation' && !isHepatoQuantObject(o) &&
                    (wanted.isEmpty() || ((o.className ?: '') as String).toLowerCase() in wanted)
        }
    }

    private static List<Integer> selectedIndices(List<Map> objects, Closure<Boolean> keep) {
        List<Integer> indices = []
        objects.eachWithIndex { Map o, int i -> if (keep(o)) indices << i }
        return indices
    }

    /** Class name -> [r, g, b] of every classified feature of a QuPath GeoJSON text (nested childObjects too). */
    static Map<String, List<Integer>> classColours(String geoJson, String source) {
        Map<String, List<Integer>> colours = [:]
        topLevelFeatures(parseJson(geoJson, source), source).each { collectColours(it, colours) }
        return colours
    }

    private static void collectColours(Object feature, Map<String, List<Integer>> colours) {
        if (!(feature instanceof Map)) return
        Map properties = (Map) (feature.properties ?: [:])
        def classification = properties.classification
        if (classification instanceof Map && classification.color instanceof List) {
            String name = classification.name ?: (classification.names instanceof List ? classification.names.join(': ') : null)
            if (name && !colours.containsKey(name)) colours[name] = classification.color.collect { asLong(it) as int }
        }
        (properties.childObjects ?: []).each { collectColours(it, colours) }  // QuPath reads children only here
    }

    /** QuPath's packed RGB integer (what PathClass.setColor takes). */
    static int packRgb(List<Integer> rgb) {
        return (int) ((255L << 24) | ((rgb[0] & 0xFF) << 16) | ((rgb[1] & 0xFF) << 8) | (rgb[2] & 0xFF))
    }

    static List topLevelFeatures(Object json, String source) {
        if (json instanceof List) return (List) json
        if (json instanceof Map && json.type == 'FeatureCollection' && json.features instanceof List) return (List) json.features
        if (json instanceof Map && json.type == 'Feature') return [json]
        throw new Problem("${source} is not QuPath GeoJSON (a FeatureCollection, a list of Features or a Feature)",
                'INVALID_ARGUMENT')
    }

    /** Refuses a results file holding objects HepatoQuant did not write: they could never be replaced later. */
    static void checkAllHepatoQuant(String geoJson, String source) {
        List features = topLevelFeatures(parseJson(geoJson, source), source)
        features.eachWithIndex { Object feature, int i ->
            Map properties = feature instanceof Map ? (Map) (feature.properties ?: [:]) : [:]
            def classification = properties.classification
            String className = classification instanceof Map ? classification.name : classification
            Map object = [name: properties.name, metadata: properties.metadata ?: [:],
                          objectType: (properties.objectType ?: 'annotation'), className: className]
            if (!isHepatoQuantObject(object)) {
                throw new Problem("${source}: feature ${i + 1} (${object.objectType} '${properties.name ?: className ?: 'unnamed'}') " +
                        'was not written by HepatoQuant; point RESULTS_FOLDER at the folder of HepatoQuant ' +
                        "results, or import this file with QuPath's File > Import objects", 'INVALID_ARGUMENT')
            }
        }
    }

    // ------------------------------------------------------------------------------------------------------------
    // Result files made elsewhere: "<slide file stem>.geojson", as the server and `hepatoquant analyze` name them

    /** The file name without its last extension, as Python's Path.stem (the server names results this way). */
    static String fileStem(String fileName) {
        String name = fileName.replace('\\', '/')
        name = name.substring(name.lastIndexOf('/') + 1)
        int dot = name.lastIndexOf('.')
        return dot > 0 ? name.substring(0, dot) : name
    }

    /** Stems to look for: the slide file's (what the server uses), then the project's image name's. */
    static List<String> resultStems(String imagePath, String imageName) {
        List<String> stems = []
        if (imagePath) stems << fileStem(imagePath)
        if (imageName && !(fileStem(imageName) in stems)) stems << fileStem(imageName)
        return stems
    }

    static File findResultFile(File folder, List<String> stems, String imageLabel) {
        if (folder == null || !folder.isDirectory()) {
            throw new Problem("RESULTS_FOLDER '${folder}' is not a folder; set it at the top of the script to the " +
                    'folder holding the HepatoQuant .geojson results', 'NOT_FOUND')
        }
        List<String> tried = []
        for (String stem : stems) {
            for (String suffix : RESULT_SUFFIXES) {
                File candidate = new File(folder, stem + suffix)
                tried << candidate.name
                if (candidate.isFile()) return candidate
            }
        }
        List<String> present = (folder.list() ?: new String[0]).findAll { it.endsWith('.geojson') }.sort().take(5)
        throw new Problem("no HepatoQuant result for image '${imageLabel}' in ${folder}: looked for " +
                "${tried.join(', ')}; GeoJSON files there: ${present ? present.join(', ') : 'none'}", 'NOT_FOUND')
    }

    /** Reads a result file as text (.gz and .zip as QuPath reads them) for checks before QuPath imports it. */
    static String readResultText(File file) {
        InputStream input = new FileInputStream(file)
        try {
            if (file.name.endsWith('.gz')) {
                input = new java.util.zip.GZIPInputStream(input)
            } else if (file.name.endsWith('.zip')) {
                def zip = new java.util.zip.ZipInputStream(input)
                def entry = zip.nextEntry
                while (entry != null && (entry.directory || !(entry.name.endsWith('.geojson') || entry.name.endsWith('.json')))) {
                    entry = zip.nextEntry
                }
                if (entry == null) throw new Problem("${file} holds no .geojson or .json file", 'INVALID_ARGUMENT')
                input = zip
            }
            return input.getText('UTF-8')
        } finally {
            input.close()
        }
    }

    // ------------------------------------------------------------------------------------------------------------
    // Files written: exports and the project summary, atomically (temporary file, then rename)

    static File exportTarget(File folder, String imagePath) {
        if (!folder.isDirectory() && !folder.mkdirs()) {
            throw new Problem("cannot create the export folder ${folder}; set EXPORT_FOLDER to a folder you can " +
                    'write to', 'PERMISSION_DENIED')
        }
        return new File(folder, fileStem(imagePath) + '.geojson')
    }

    /** A temporary file next to target (same folder, so the final rename is atomic). */
    static File temporaryNextTo(File target) {
        return new File(target.parentFile, '.' + target.name + '.' + UUID.randomUUID().toString().take(8) + '.partial.geojson')
    }

    static void publish(File temporary, File target) {
        java.nio.file.Files.move(temporary.toPath(), target.toPath(), java.nio.file.StandardCopyOption.REPLACE_EXISTING,
                java.nio.file.StandardCopyOption.ATOMIC_MOVE)
    }

    /** Leading columns of the project summary; then "<CODE>_pct" and "<CODE>_tiles" per tissue class. */
    static final List<String> SUMMARY_LEADING_COLUMNS = ['image', 'region', 'region_class', 'region_area_mm2',
                                                          'tiles', 'tile_area_mm2']

    /**
     * One summary row per HepatoQuant region annotation of an image, from its measurements
     * (regions: [name, className, metadata, objectType, measurements: {name: number}]).
     */
    static List<Map> summaryRows(String image, List<Map> regions) {
        List<Map> rows = []
        regions.findAll { it.objectType == 'annotation' && isHepatoQuantObject(it) }.each { Map region ->
            Map measurements = (Map) (region.measurements ?: [:])
            if (!measurements.containsKey(TILE_COUNT_MEASUREMENT)) return
            Map row = [image: image, region: ((region.name ?: '') as String) - REGION_NAME_PREFIX,
                       region_class: region.className ?: '',
                       region_area_mm2: measurements[REGION_AREA_MEASUREMENT],
                       tiles: measurements[TILE_COUNT_MEASUREMENT],
                       tile_area_mm2: measurements[TILE_AREA_MEASUREMENT]]
            measurements.each { String name, value ->
                def percent = name =~ /^([A-Z]{3}) %$/
                def tiles = name =~ /^([A-Z]{3}) tiles$/
                if (percent.matches()) row[percent.group(1) + '_pct'] = value
                if (tiles.matches()) row[tiles.group(1) + '_tiles'] = value
            }
            rows << row
        }
        return rows
    }

    /** The summary's columns: the leading ones, then each class's columns in the order the rows first show them. */
    static List<String> summaryColumns(List<Map> rows) {
        List<String> codes = []
        rows.each { row ->
            row.keySet().each { String key ->
                // from the counts too: a region without tiles has "<CODE>_tiles" = 0 and no percentages at all
                if (key.endsWith('_pct') || key.endsWith('_tiles')) {
                    String code = key.substring(0, key.lastIndexOf('_'))
                    if (!(code in codes)) codes << code
                }
            }
        }
        return SUMMARY_LEADING_COLUMNS + codes.collectMany { [it + '_pct', it + '_tiles'] }
    }

    /** Writes the rows as CSV (RFC 4180 quoting), atomically. Measurement values are float32 in QuPath: 7 digits. */
    static void writeCsv(File target, List<String> columns, List<Map> rows) {
        File temporary = new File(target.parentFile, '.' + target.name + '.partial')
        temporary.withWriter('UTF-8') { writer ->
            writer.write(columns.collect { csvCell(it) }.join(',') + '\r\n')
            rows.each { row -> writer.write(columns.collect { csvCell(row[it]) }.join(',') + '\r\n') }
        }
        java.nio.file.Files.move(temporary.toPath(), target.toPath(), java.nio.file.StandardCopyOption.REPLACE_EXISTING,
                java.nio.file.StandardCopyOption.ATOMIC_MOVE)
    }

    static String csvCell(Object value) {
        if (value == null) return ''
        String text
        if (value instanceof Number) {
            double number = ((Number) value).doubleValue()
            if (Double.isNaN(number) || Double.isInfinite(number)) {
                text = ''
            } else {
                text = new BigDecimal(number).round(new java.math.MathContext(7)).stripTrailingZeros().toPlainString()
            }
        } else {
            text = value.toString()
        }
        return text.contains(',') || text.contains('"') || text.contains('\n') || text.contains('\r') ?
                '"' + text.replace('"', '""') + '"' : text
    }
}
// ---- END HEPATOQUANT CORE ------------------------------------------------------------------------------------
