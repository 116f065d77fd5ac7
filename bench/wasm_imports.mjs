// Runs bench/mp_imports.py on the MicroPython webassembly port (32-bit, the
// ESP32's word size) with the compiled firmware copied into its in-memory
// filesystem. argv: package dir, firmware dir, mp_imports.py, module list.
import fs from "fs";
import path from "path";

const [pkg, firmware, script, modules] = process.argv.slice(2);
const { loadMicroPython } = await import(path.resolve(pkg, "micropython.mjs"));
const mp = await loadMicroPython({ stdout: (l) => console.log(l), stderr: (l) => console.error(l) });
function copy(src, dst) {
  mp.FS.mkdirTree(dst);
  for (const e of fs.readdirSync(src, { withFileTypes: true })) {
    if (e.isDirectory()) copy(path.join(src, e.name), dst + "/" + e.name);
    else if (e.name.endsWith(".mpy")) mp.FS.writeFile(dst + "/" + e.name, fs.readFileSync(path.join(src, e.name)));
  }
}
copy(firmware, "/fw");
mp.runPython(`import sys\nsys.path[:0] = ["/fw", "/fw/lib"]\nMODULES = ${JSON.stringify(modules.split(","))}\n` + fs.readFileSync(script, "utf8"));
