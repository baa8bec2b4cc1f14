// Parses an AsyncAPI document (a file path, or "-" for stdin) with the official parser and
// prints its diagnostics as JSON lines; exits 1 when one has error severity (0), else 0.
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";

const source = readFileSync(process.argv[2] === "-" ? 0 : process.argv[2], "utf8");
const { document, diagnostics } = await new Parser().parse(source);
for (const d of diagnostics) {
  console.log(JSON.stringify({ severity: d.severity, code: d.code, message: d.message, path: d.path }));
}
const errors = diagnostics.filter((d) => d.severity === 0);
process.exit(document === undefined || errors.length ? 1 : 0);
