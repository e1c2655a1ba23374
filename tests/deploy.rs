//! Keeps `deploy/` (and the README's and examples' shell snippets) honest against this binary:
//!
//! - every `tokenvault <subcommand> --flag` in a deploy file, README or example README names
//!   a real subcommand and a flag that subcommand accepts (walking the clap definition, which
//!   also sees global flags and `env` attributes);
//! - every `TOKENVAULT_*` variable they mention is read by the binary, and variables set for
//!   a container or unit that runs `serve` are ones `serve` reads;
//! - the YAML files parse, and the Kubernetes objects keep their security settings;
//! - the example TOML parses into [`Config`], validates, and lists every setting;
//! - the Dockerfile is multi-stage, non-root, has a HEALTHCHECK, and copies only paths that
//!   exist;
//! - `systemd-analyze verify` accepts the unit (when `systemd-analyze` is installed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use serde_norway::Value;
use tokenvault::config::Config;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_tokenvault");

/// Flags and variables the deploy files use that are still being wired into the binary.
/// Each is reported (not failed) while missing; once it exists the test fails until it is
/// removed from this list, so the list cannot go stale.
const PENDING: &[(&str, &str)] = &[];

/// Variables the binary reads directly rather than through a clap `env` attribute.
const EXTRA_ENV: &[&str] = &["TOKENVAULT_MASTER_KEY"];

/// The CLI as data: subcommand path ("serve", "keys rotate") -> its long flags and env vars.
struct CliModel {
    commands: BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)>,
    all_env: BTreeSet<String>,
}

impl CliModel {
    fn new() -> CliModel {
        let mut root = tokenvault::cli::Cli::command();
        root.build();
        let mut model = CliModel {
            commands: BTreeMap::new(),
            all_env: EXTRA_ENV.iter().map(|s| s.to_string()).collect(),
        };
        model.walk(&root, "");
        model
    }

    fn walk(&mut self, cmd: &clap::Command, path: &str) {
        let mut flags: BTreeSet<String> = ["--help".to_string()].into();
        let mut envs = BTreeSet::new();
        for arg in cmd.get_arguments() {
            if let Some(long) = arg.get_long() {
                flags.insert(format!("--{long}"));
            }
            for alias in arg.get_all_aliases().unwrap_or_default() {
                flags.insert(format!("--{alias}"));
            }
            if let Some(env) = arg.get_env() {
                let env = env.to_string_lossy().into_owned();
                self.all_env.insert(env.clone());
                envs.insert(env);
            }
        }
        if path.is_empty() {
            flags.insert("--version".into());
        }
        // Variables read directly apply wherever the vault is opened; allow them everywhere.
        envs.extend(EXTRA_ENV.iter().map(|s| s.to_string()));
        self.commands.insert(path.to_owned(), (flags, envs));
        for sub in cmd.get_subcommands() {
            let sub_path = if path.is_empty() {
                sub.get_name().to_owned()
            } else {
                format!("{path} {}", sub.get_name())
            };
            self.walk(sub, &sub_path);
        }
    }

    fn is_subcommand(&self, parent: &str, word: &str) -> bool {
        let path = if parent.is_empty() {
            word.to_owned()
        } else {
            format!("{parent} {word}")
        };
        self.commands.contains_key(&path)
    }
}

#[derive(Default)]
struct Report {
    errors: Vec<String>,
    pending_seen: BTreeSet<(String, String)>,
    invocations: usize,
}

impl Report {
    /// A missing flag or variable: an error unless it is pending.
    fn missing(&mut self, command: &str, item: &str, message: String) {
        if PENDING.contains(&(command, item)) {
            self.pending_seen
                .insert((command.to_owned(), item.to_owned()));
        } else {
            self.errors.push(message);
        }
    }
}

fn is_program(token: &str) -> bool {
    let t = token.trim_matches(|c| c == '"' || c == '\'');
    t == "tokenvault" || t.ends_with("bin/tokenvault")
}

/// Checks one tokenvault argument vector (after the program name). Returns the subcommand
/// path when the words name one; `strict` reports words that do not.
fn check_argv(
    model: &CliModel,
    args: &[String],
    origin: &str,
    strict: bool,
    report: &mut Report,
) -> Option<String> {
    let mut path = String::new();
    let mut global_errors = Vec::new();
    let mut rest = args.iter().peekable();
    // Global flags may come before the subcommand; skip them (and a value).
    while let Some(word) = rest.peek() {
        if word.starts_with("--") {
            let flag = word.split('=').next().unwrap_or(word);
            let (flags, _) = &model.commands[""];
            if !flags.contains(flag) {
                global_errors.push(format!("{origin}: tokenvault has no option {flag}"));
            }
            let takes_value = !word.contains('=') && !matches!(flag, "--help" | "--version");
            rest.next();
            if takes_value {
                rest.next();
            }
        } else {
            break;
        }
    }
    while let Some(word) = rest.peek() {
        if word.starts_with('-') || !model.is_subcommand(&path, word) {
            break;
        }
        path = if path.is_empty() {
            word.to_string()
        } else {
            format!("{path} {word}")
        };
        rest.next();
    }
    if path.is_empty() {
        if strict {
            report.errors.extend(global_errors);
            report.errors.push(format!(
                "{origin}: `tokenvault {}` names no subcommand",
                args.join(" ")
            ));
        }
        return None;
    }
    report.errors.extend(global_errors);
    report.invocations += 1;
    let prefix = format!("{path} ");
    if model.commands.keys().any(|k| k.starts_with(&prefix)) {
        let next = rest.peek().map(|w| w.as_str()).unwrap_or("");
        if !matches!(next, "--help" | "-h") {
            report.errors.push(format!(
                "{origin}: `tokenvault {path}` has no subcommand {next:?}"
            ));
        }
    }
    let (flags, _) = &model.commands[&path];
    for word in rest {
        if word == "--" {
            break;
        }
        if let Some(stripped) = word.strip_prefix("--") {
            let flag = format!("--{}", stripped.split('=').next().unwrap_or(""));
            if !flags.contains(&flag) {
                report.missing(
                    &path,
                    &flag,
                    format!("{origin}: `tokenvault {path}` has no option {flag}"),
                );
            }
        }
    }
    Some(path)
}

/// Checks variables set for a process that runs `command`.
fn check_env_for(
    model: &CliModel,
    command: Option<&str>,
    names: &[String],
    origin: &str,
    report: &mut Report,
) {
    for name in names.iter().filter(|n| n.starts_with("TOKENVAULT_")) {
        match command {
            Some(cmd) if !model.commands[cmd].1.contains(name) => report.missing(
                cmd,
                name,
                format!("{origin}: `tokenvault {cmd}` does not read {name}"),
            ),
            None if !model.all_env.contains(name) => report
                .errors
                .push(format!("{origin}: tokenvault reads no variable {name}")),
            _ => {}
        }
    }
}

/// Shell-ish lines: joins `\` continuations, strips comment markers, and finds every
/// `tokenvault SUBCOMMAND ...` (or `cargo run ... -- SUBCOMMAND ...`) in them.
fn scan_text(model: &CliModel, text: &str, origin: &str, report: &mut Report) {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim_start().trim_start_matches('#').trim_start();
        if let Some(body) = line.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
        } else {
            current.push_str(line);
            logical.push(std::mem::take(&mut current));
        }
    }
    logical.push(current);
    for line in logical {
        for segment in line.split(['|', ';', '`', '(', ')']) {
            let segment = segment.replace("&&", " ");
            let words: Vec<String> = segment
                .split_whitespace()
                .take_while(|w| *w != "#")
                .map(|w| {
                    w.trim_matches(|c| c == '"' || c == '\'' || c == ',')
                        .to_owned()
                })
                .collect();
            for (i, w) in words.iter().enumerate() {
                let cargo_run = w == "--"
                    && words[..i]
                        .windows(2)
                        .any(|p| p[0] == "cargo" && p[1] == "run");
                let start = (is_program(w) || cargo_run).then_some(i + 1);
                if let Some(start) = start {
                    check_argv(model, &words[start..], origin, false, report);
                }
            }
        }
    }
    for name in env_names(text) {
        if !model.all_env.contains(&name) {
            report
                .errors
                .push(format!("{origin}: tokenvault reads no variable {name}"));
        }
    }
}

fn env_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("TOKENVAULT_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        if name.len() > "TOKENVAULT_".len() && !name.ends_with('_') {
            names.insert(name.to_owned());
        }
        rest = &tail[end.max(1)..];
    }
    names
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(items) => items
            .iter()
            .filter_map(|i| match i {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(b.to_string()),
                _ => None,
            })
            .collect(),
        Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml_documents(rel: &str) -> Vec<Value> {
    use serde::Deserialize;
    let text = read(rel);
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let mut value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: {e}"));
        value
            .apply_merge()
            .unwrap_or_else(|e| panic!("{rel}: merge keys: {e}"));
        if !value.is_null() {
            docs.push(value);
        }
    }
    assert!(!docs.is_empty(), "{rel}: no YAML documents");
    docs
}

fn files_under(rel: &str, ext: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::from(ROOT).join(rel)];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if ext.iter().any(|e| p.to_string_lossy().ends_with(e)) {
                out.push(p.strip_prefix(ROOT).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

/// A container's argv (tokenvault image: the entrypoint is the binary) and checks.
fn check_container(model: &CliModel, c: &Value, origin: &str, report: &mut Report) {
    let command = strings(&c["command"]);
    let args = strings(&c["args"]);
    let name = c["name"].as_str().unwrap_or("?");
    let origin = format!("{origin} container {name}");
    let sub = if command.is_empty() || command.first().is_some_and(|w| is_program(w)) {
        let argv: Vec<String> = command.iter().skip(1).chain(args.iter()).cloned().collect();
        check_argv(model, &argv, &origin, true, report)
    } else {
        // A shell script: the text scan covers the tokenvault lines in it.
        None
    };
    let env: Vec<String> = c["env"]
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|e| e["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    check_env_for(model, sub.as_deref(), &env, &origin, report);
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let exec = strings(&c[probe]["exec"]["command"]);
        if let Some((program, argv)) = exec.split_first() {
            assert!(is_program(program), "{origin} {probe}: {program}");
            check_argv(model, argv, &format!("{origin} {probe}"), true, report);
        }
    }
}

fn check_kubernetes(model: &CliModel, report: &mut Report) {
    let files = files_under("deploy/kubernetes", &[".yaml", ".yml"]);
    assert!(files.len() >= 5, "{files:?}");
    let mut kinds = BTreeSet::new();
    for rel in &files {
        for doc in yaml_documents(rel) {
            if rel.ends_with("kustomization.yaml") {
                for r in strings(&doc["resources"]) {
                    let p = Path::new(ROOT).join("deploy/kubernetes").join(&r);
                    assert!(p.is_file(), "{rel}: resource {r} does not exist");
                }
                continue;
            }
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{rel}: no kind"));
            assert!(doc["apiVersion"].is_string(), "{rel}: no apiVersion");
            kinds.insert(kind.to_owned());
            if kind != "StatefulSet" {
                continue;
            }
            let spec = &doc["spec"];
            assert_eq!(
                spec["replicas"].as_u64(),
                Some(1),
                "{rel}: SQLite is single-writer"
            );
            assert!(
                spec["volumeClaimTemplates"].is_sequence(),
                "{rel}: no PVC template"
            );
            let pod = &spec["template"]["spec"];
            assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"].as_str(),
                Some("RuntimeDefault")
            );
            let mut containers = strings_seq(&pod["containers"]);
            containers.extend(strings_seq(&pod["initContainers"]));
            for c in &containers {
                let sc = &c["securityContext"];
                let name = c["name"].as_str().unwrap_or("?");
                assert_eq!(
                    sc["allowPrivilegeEscalation"].as_bool(),
                    Some(false),
                    "{name}"
                );
                assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{name}");
                assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true), "{name}");
                assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{name}");
                assert!(c["resources"]["requests"].is_mapping(), "{name}: requests");
                assert!(c["resources"]["limits"].is_mapping(), "{name}: limits");
                check_container(model, c, rel, report);
            }
            for c in &containers {
                check_mounts(pod, c, rel);
            }
            let main = &pod["containers"][0];
            check_probes(main, rel);
        }
    }
    for kind in ["StatefulSet", "Service", "Secret", "NetworkPolicy"] {
        assert!(kinds.contains(kind), "deploy/kubernetes has no {kind}");
    }
    // The NetworkPolicy admits only labelled clients on the gRPC port.
    let np = read("deploy/kubernetes/networkpolicy.yaml");
    assert!(np.contains("tokenvault-client: \"true\""), "{np}");
}

/// Lays out a container's volume mounts as the runtime would: a mount point nested inside
/// another mount must be created inside that volume, which fails when the outer mount is
/// read-only (`readOnly: true`, or a Secret, ConfigMap, projected or downward API volume,
/// which the kubelet always mounts read-only): `mkdir …: read-only file system`, and the pod
/// never starts. Schema validation cannot see this.
fn check_mounts(pod: &Value, c: &Value, origin: &str) {
    let name = c["name"].as_str().unwrap_or("?");
    let volumes: BTreeMap<String, Value> = strings_seq(&pod["volumes"])
        .into_iter()
        .filter_map(|v| Some((v["name"].as_str()?.to_owned(), v)))
        .collect();
    let mounts: Vec<(String, String, bool)> = strings_seq(&c["volumeMounts"])
        .iter()
        .map(|m| {
            let vol = m["name"]
                .as_str()
                .expect("mount without a volume name")
                .to_owned();
            let path = m["mountPath"].as_str().expect("mount without a path");
            let path = path.trim_end_matches('/').to_owned();
            let read_only = m["readOnly"].as_bool() == Some(true)
                || volumes.get(&vol).is_some_and(|v| {
                    ["secret", "configMap", "projected", "downwardAPI"]
                        .iter()
                        .any(|k| !v[*k].is_null())
                });
            (vol, path, read_only)
        })
        .collect();
    for (vol, path, _) in &mounts {
        assert!(
            volumes.contains_key(vol) || vol == "data",
            "{origin} container {name}: mount of undeclared volume {vol}"
        );
        assert_eq!(
            mounts.iter().filter(|(_, p, _)| p == path).count(),
            1,
            "{origin} container {name}: two mounts at {path}"
        );
    }
    for (inner_vol, inner, _) in &mounts {
        for (outer_vol, outer, outer_ro) in &mounts {
            if inner.starts_with(&format!("{outer}/")) && *outer_ro {
                panic!(
                    "{origin} container {name}: volume {inner_vol} is mounted at {inner}, inside \
                     the read-only mount of {outer_vol} at {outer}; the runtime cannot create \
                     the mount point (read-only file system) and the pod does not start"
                );
            }
        }
    }
}

/// Liveness, readiness and startup are different questions: live = the process answers
/// (`/livez`); ready = storage writable, keys loaded, not stopping (`/readyz`). The probes
/// must not all run the same check, and HTTP probes must target the metrics listener.
fn check_probes(main: &Value, origin: &str) {
    let args = strings(&main["args"]);
    let metrics_port = args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-listen="))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.parse::<u64>().ok());
    let port_named = |name: &str| {
        strings_seq(&main["ports"])
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
    };
    let mut seen = BTreeMap::new();
    for (probe, path) in [
        ("livenessProbe", "/livez"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/readyz"),
    ] {
        let p = &main[probe];
        assert!(p.is_mapping(), "{origin}: {probe} missing");
        let get = &p["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{origin}: {probe} path");
        let port = match &get["port"] {
            Value::Number(n) => n.as_u64(),
            Value::String(name) => port_named(name),
            _ => None,
        };
        assert!(
            port.is_some() && port == metrics_port,
            "{origin}: {probe} must target the --metrics-listen port {metrics_port:?}, got {port:?}"
        );
        seen.insert(probe, path);
    }
    assert_ne!(seen["livenessProbe"], seen["readinessProbe"], "{origin}");
}

fn strings_seq(v: &Value) -> Vec<Value> {
    v.as_sequence().cloned().unwrap_or_default()
}

fn check_compose(model: &CliModel, report: &mut Report) {
    let rel = "deploy/docker-compose.yml";
    let docs = yaml_documents(rel);
    let services = docs[0]["services"].as_mapping().expect("services");
    assert!(services.len() >= 2, "{rel}: vault and init");
    let volumes = docs[0]["volumes"].as_mapping().expect("named volumes");
    assert!(!volumes.is_empty(), "{rel}: a persistent volume");
    for (name, svc) in services {
        let name = name.as_str().unwrap_or("?");
        let origin = format!("{rel} service {name}");
        let entrypoint = strings(&svc["entrypoint"]);
        let command = strings(&svc["command"]);
        let sub = if entrypoint.is_empty() || entrypoint.first().is_some_and(|w| is_program(w)) {
            check_argv(model, &command, &origin, true, report)
        } else {
            None // shell script: covered by the text scan
        };
        let env: Vec<String> = match &svc["environment"] {
            Value::Mapping(m) => m
                .keys()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect(),
            Value::Sequence(s) => s
                .iter()
                .filter_map(|e| e.as_str()?.split('=').next().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        check_env_for(model, sub.as_deref(), &env, &origin, report);
        let test = strings(&svc["healthcheck"]["test"]);
        if let Some(pos) = test.iter().position(|w| is_program(w)) {
            check_argv(model, &test[pos + 1..], &origin, true, report);
        }
    }
}

/// Exec-form JSON arrays of the Dockerfile (`CMD`, `ENTRYPOINT`, `HEALTHCHECK ... CMD`).
fn check_dockerfile(model: &CliModel, report: &mut Report) {
    let rel = "deploy/Dockerfile";
    let text = read(rel);
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(body) => {
                current.push_str(body);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let exec_form = |ins: &str| -> Vec<String> {
        let start = ins.find('[').expect("exec form");
        serde_json::from_str(&ins[start..]).unwrap_or_else(|e| panic!("{rel}: {ins}: {e}"))
    };
    let from = instructions
        .iter()
        .filter(|i| i.starts_with("FROM "))
        .count();
    assert!(from >= 2, "{rel}: multi-stage build");
    let user = instructions
        .iter()
        .rev()
        .find(|i| i.starts_with("USER "))
        .expect("USER");
    assert!(
        !user.contains("root") && !user.ends_with(" 0"),
        "{rel}: {user}"
    );
    assert!(
        instructions
            .iter()
            .any(|i| i.starts_with("VOLUME") && i.contains("/var/lib/tokenvault")),
        "{rel}: data volume"
    );
    let entrypoint = instructions
        .iter()
        .find(|i| i.starts_with("ENTRYPOINT"))
        .map(|i| exec_form(i))
        .expect("ENTRYPOINT");
    assert!(is_program(&entrypoint[0]), "{rel}: {entrypoint:?}");
    let cmd = instructions
        .iter()
        .find(|i| i.starts_with("CMD"))
        .map(|i| exec_form(i))
        .expect("CMD");
    let sub = check_argv(model, &cmd, rel, true, report);
    assert_eq!(sub.as_deref(), Some("serve"), "{rel}: CMD runs serve");
    let health = instructions
        .iter()
        .find(|i| i.starts_with("HEALTHCHECK"))
        .map(|i| exec_form(i))
        .expect("HEALTHCHECK");
    assert!(is_program(&health[0]), "{rel}: {health:?}");
    assert_eq!(
        check_argv(model, &health[1..], rel, true, report).as_deref(),
        Some("health")
    );
    // Variables set image-wide must be read by some command.
    let env: Vec<String> = instructions
        .iter()
        .filter(|i| i.starts_with("ENV "))
        .flat_map(|i| env_names(i))
        .collect();
    check_env_for(model, None, &env, rel, report);
    // Every path the build copies exists in the repository.
    for ins in instructions
        .iter()
        .filter(|i| i.starts_with("COPY ") && !i.contains("--from"))
    {
        let parts: Vec<&str> = ins.split_whitespace().skip(1).collect();
        for src in &parts[..parts.len() - 1] {
            assert!(
                Path::new(ROOT).join(src).exists(),
                "{rel}: COPY source {src} does not exist"
            );
        }
    }
}

fn unit_exec_start(text: &str) -> Vec<String> {
    let mut joined = String::new();
    let mut in_exec = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("ExecStart=") {
            in_exec = true;
        }
        if in_exec {
            joined.push_str(t.trim_end_matches('\\'));
            joined.push(' ');
            if !t.ends_with('\\') {
                break;
            }
        }
    }
    joined
        .trim_start_matches("ExecStart=")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn check_systemd(model: &CliModel, report: &mut Report) {
    let rel = "deploy/systemd/tokenvault.service";
    let text = read(rel);
    let exec = unit_exec_start(&text);
    assert!(is_program(&exec[0]), "{rel}: {exec:?}");
    let sub = check_argv(model, &exec[1..], rel, true, report);
    assert_eq!(sub.as_deref(), Some("serve"));
    let env: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Environment="))
        .filter_map(|v| v.split('=').next().map(str::to_owned))
        .collect();
    check_env_for(model, sub.as_deref(), &env, rel, report);
    // `systemctl reload` must reach the server (SIGHUP re-reads TLS files and master key)...
    assert!(
        text.lines()
            .any(|l| l.starts_with("ExecReload=") && l.contains("-HUP") && l.contains("$MAINPID")),
        "{rel}: no ExecReload= sending SIGHUP to $MAINPID"
    );
    // ...and the TLS files must be ones a renewal changes: LoadCredential= copies (%d/…) are
    // made once at start, so a reload or the file watcher would keep serving the old ones.
    for flag in ["--tls-cert", "--tls-key", "--client-ca"] {
        if let Some(i) = exec.iter().position(|w| w == flag) {
            let path = &exec[i + 1];
            assert!(
                !path.starts_with("%d") && !path.contains("CREDENTIALS_DIRECTORY"),
                "{rel}: {flag} {path} is a credential copy that never sees a renewal"
            );
        }
    }
    for setting in [
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "LimitCORE=0",
        "MemoryDenyWriteExecute=yes",
        "CapabilityBoundingSet=\n",
        "StateDirectory=tokenvault",
        "LoadCredential=master.key:/etc/tokenvault/master.key",
        "TOKENVAULT_MASTER_KEY_FILE=%d/master.key",
        "User=tokenvault",
    ] {
        assert!(text.contains(setting), "{rel}: missing {setting:?}");
    }
}

#[test]
fn deploy_files_use_only_real_flags_and_variables() {
    let model = CliModel::new();
    let mut report = Report::default();
    check_dockerfile(&model, &mut report);
    check_compose(&model, &mut report);
    check_kubernetes(&model, &mut report);
    check_systemd(&model, &mut report);
    let mut texts = files_under("deploy", &[""]);
    texts.push("README.md".into());
    texts.extend(files_under("examples", &["README.md"]));
    for rel in &texts {
        if rel.ends_with(".dockerignore") {
            continue;
        }
        scan_text(&model, &read(rel), rel, &mut report);
    }
    for (cmd, item) in &report.pending_seen {
        println!(
            "note: `tokenvault {cmd}` {item} is used in deploy/ and still being wired (PENDING)"
        );
    }
    for (cmd, item) in PENDING {
        let (flags, envs) = &model.commands[*cmd];
        assert!(
            !flags.contains(*item) && !envs.contains(*item),
            "`tokenvault {cmd}` now has {item}: remove it from PENDING in tests/deploy.rs"
        );
    }
    assert!(
        report.invocations >= 10,
        "only {} invocations found",
        report.invocations
    );
    assert!(
        report.errors.is_empty(),
        "deploy files disagree with the binary:\n  {}",
        report.errors.join("\n  ")
    );
}

#[test]
fn the_model_catches_a_wrong_flag() {
    let model = CliModel::new();
    let mut report = Report::default();
    scan_text(
        &model,
        "tokenvault serve --listn 0.0.0.0:1\n# tokenvault clients add x --roles info \\\n  --bogus 1\n\
         echo TOKENVAULT_NOPE\ncargo run -- keys rotat --x\n",
        "t",
        &mut report,
    );
    let text = report.errors.join("\n");
    assert!(text.contains("--listn"), "{text}");
    assert!(
        text.contains("`tokenvault clients add` has no option --bogus"),
        "{text}"
    );
    assert!(text.contains("TOKENVAULT_NOPE"), "{text}");
    assert!(
        text.contains("`tokenvault keys` has no subcommand \"rotat\""),
        "{text}"
    );
    assert_eq!(report.errors.len(), 5, "{text}");
    // Correct lines pass, including `--flag=value`, globals and `cargo run --`.
    let mut ok = Report::default();
    scan_text(
        &model,
        "tokenvault --log-format json serve --listen=127.0.0.1:1 --dev\n\
         cargo run --release -- audit tail -n 5\ndocker build -t tokenvault .\n",
        "t",
        &mut ok,
    );
    assert!(ok.errors.is_empty(), "{:?}", ok.errors);
    assert_eq!(ok.invocations, 2);
}

#[test]
fn example_toml_parses_validates_and_lists_every_setting() {
    let rel = "deploy/tokenvault.example.toml";
    let text = read(rel);
    let cfg = Config::from_toml(&text).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let warnings = cfg.validate().unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    // Every key the configuration knows appears in the example (the rendered effective
    // configuration has all keys when every optional one is set, as in the example).
    let keys = |t: &str| -> BTreeSet<String> {
        let table: toml::Table = toml::from_str(t).unwrap();
        table
            .iter()
            .flat_map(|(section, v)| {
                v.as_table()
                    .into_iter()
                    .flat_map(move |t| t.keys().map(move |k| format!("{section}.{k}")))
            })
            .collect()
    };
    let rendered = toml::to_string(&cfg).unwrap();
    assert_eq!(keys(&text), keys(&rendered), "example vs. Config fields");
    // And the binary agrees.
    let out = std::process::Command::new(BIN)
        .args(["config", "check", "--no-files", "--config"])
        .arg(Path::new(ROOT).join(rel))
        .env_remove("TOKENVAULT_LISTEN")
        .env_remove("TOKENVAULT_DATA_DIR")
        .env_remove("TOKENVAULT_MASTER_KEY_FILE")
        .env_remove("TOKENVAULT_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_unit_verifies() {
    let which = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output();
    if !which.is_ok_and(|o| o.status.success()) {
        println!("note: systemd-analyze not available; skipping `systemd-analyze verify`");
        return;
    }
    // The unit names /usr/local/bin/tokenvault, which need not exist here: verify a copy
    // that points at the binary cargo built.
    let text = read("deploy/systemd/tokenvault.service").replace("/usr/local/bin/tokenvault", BIN);
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("tokenvault.service");
    std::fs::write(&unit, text).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("tokenvault.service"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify failed ({:?}):\n{stderr}",
        out.status.code()
    );
}

/// Metric names the monitoring files may use: the `tokenvault_*` names `src/metrics.rs`
/// defines (histograms also as `_bucket`, `_sum`, `_count`) and the process collector's.
fn exported_metric_names() -> BTreeSet<String> {
    let source = read("src/metrics.rs");
    let mut names = BTreeSet::new();
    for part in source.split('"').skip(1).step_by(2) {
        if part.starts_with("tokenvault_")
            && part.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            for suffix in ["", "_bucket", "_sum", "_count"] {
                names.insert(format!("{part}{suffix}"));
            }
        }
    }
    for p in [
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_start_time_seconds",
        "process_threads",
    ] {
        names.insert(p.to_owned());
    }
    names
}

/// Every `tokenvault_…`/`process_…` word in `text`.
fn metric_words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("tokenvault_") || w.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn monitoring_pack_matches_the_metrics_and_the_manifests() {
    // The PrometheusRule carries exactly the promtool-checked groups.
    let plain = yaml_documents("deploy/monitoring/tokenvault.rules.yml");
    let operator = yaml_documents("deploy/monitoring/prometheusrule.yaml");
    assert_eq!(operator[0]["kind"].as_str(), Some("PrometheusRule"));
    assert_eq!(
        plain[0]["groups"], operator[0]["spec"]["groups"],
        "prometheusrule.yaml and tokenvault.rules.yml differ"
    );
    let alerts: BTreeSet<String> = strings_seq(&plain[0]["groups"])
        .iter()
        .flat_map(|g| strings_seq(&g["rules"]))
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect();
    for wanted in [
        "TokenvaultKeyNearEncryptionLimit",
        "TokenvaultKeyNearMaxAge",
        "TokenvaultAuditWriteFailures",
        "TokenvaultStorageNearLimit",
        "TokenvaultCertificateExpiresSoon",
        "TokenvaultRateLimitRejections",
        "TokenvaultDetokenizeVolumeAnomaly",
    ] {
        assert!(alerts.contains(wanted), "no alert {wanted}: {alerts:?}");
    }

    // Rules and dashboard only use metrics the binary exports (a renamed metric would
    // silently turn an alert off).
    let exported = exported_metric_names();
    let dashboard_text = read("deploy/monitoring/grafana-dashboard.json");
    for (rel, text) in [
        (
            "deploy/monitoring/tokenvault.rules.yml",
            read("deploy/monitoring/tokenvault.rules.yml"),
        ),
        (
            "deploy/monitoring/grafana-dashboard.json",
            dashboard_text.clone(),
        ),
    ] {
        for word in metric_words(&text) {
            assert!(exported.contains(&word), "{rel}: unknown metric {word}");
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard_text).unwrap();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    for p in panels {
        assert!(
            p["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "panel {} has no query",
            p["title"]
        );
    }

    // The ServiceMonitor selects the Service and names a port it has; its job label is the
    // one the rules select.
    let sm = &yaml_documents("deploy/monitoring/servicemonitor.yaml")[0];
    assert_eq!(sm["kind"].as_str(), Some("ServiceMonitor"));
    let selector = &sm["spec"]["selector"]["matchLabels"];
    let port = sm["spec"]["endpoints"][0]["port"].as_str().unwrap();
    assert_eq!(
        sm["spec"]["endpoints"][0]["path"].as_str(),
        Some("/metrics")
    );
    let services = yaml_documents("deploy/kubernetes/service.yaml");
    let scraped: Vec<&Value> = services
        .iter()
        .filter(|s| {
            selector
                .as_mapping()
                .unwrap()
                .iter()
                .all(|(k, v)| &s["metadata"]["labels"][k.as_str().unwrap()] == v)
        })
        .filter(|s| {
            strings_seq(&s["spec"]["ports"])
                .iter()
                .any(|p| p["name"].as_str() == Some(port))
        })
        .collect();
    assert_eq!(
        scraped.len(),
        1,
        "the ServiceMonitor must match one Service with port {port}"
    );
    let job_label = sm["spec"]["jobLabel"].as_str().unwrap();
    let job = scraped[0]["metadata"]["labels"][job_label]
        .as_str()
        .unwrap();
    assert!(
        read("deploy/monitoring/tokenvault.rules.yml").contains(&format!("job=\"{job}\"")),
        "rules do not select job {job}"
    );
}

#[test]
fn alert_rules_pass_promtool() {
    let ok = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("note: promtool not available; .ci/monitoring.sh installs and runs it");
        return;
    }
    for args in [
        ["check", "rules", "deploy/monitoring/tokenvault.rules.yml"],
        [
            "test",
            "rules",
            "deploy/monitoring/tokenvault.rules.test.yml",
        ],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(ROOT)
            .output()
            .unwrap();
        assert!(out.status.success(), "promtool {args:?}: {out:?}");
    }
}
