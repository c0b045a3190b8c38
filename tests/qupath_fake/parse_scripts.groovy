/* Checks that each Groovy file given parses (syntax only, no class resolution: QuPath's classes are absent here). */
import org.codehaus.groovy.control.CompilationFailedException
import org.codehaus.groovy.control.CompilationUnit
import org.codehaus.groovy.control.Phases

int failures = 0
args.each { String path ->
    def unit = new CompilationUnit()
    unit.addSource(new File(path))
    try {
        unit.compile(Phases.CONVERSION)
        println "parses: ${path}"
    } catch (CompilationFailedException e) {
        failures++
        System.err.println("${path}: ${e.message}")
    }
}
System.exit(failures ? 1 : 0)
