/** Runs a HepatoQuant QuPath script as shipped in the fake QuPath: run_script.groovy SCENARIO.json SCRIPT OUT.json */
import hqfake.FakeQuPath

FakeQuPath.load(new File(args[0]))
new GroovyShell(this.class.classLoader).evaluate(new File(args[1]))
FakeQuPath.dump(new File(args[2]))
