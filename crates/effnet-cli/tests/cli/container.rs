//! `infra/Containerfile` checked against what the built binary really needs, without a container
//! daemon: `ldd` lists the shared libraries the binary loads, `dpkg -S` names the Debian package of
//! each one outside the torch venv, and the image's runtime stage must install that package (or a
//! package that depends on it). `readelf -d` gives the RUNPATH that build.rs bakes in, which the
//! runtime stage's copy of the venv must keep valid. The image is Debian bookworm, as is every
//! machine scripts/bootstrap.sh sets up, so this machine's dpkg database answers for it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const BINARY: &str = env!("CARGO_BIN_EXE_effnet");

/// Packages every Debian image has and the binary may assume: glibc and the GCC runtime.
const BASE_PACKAGES: [&str; 3] = ["libc6", "libstdc++6", "libgcc-s1"];

fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("workspace root");
    root.canonicalize().expect("workspace root exists")
}

fn read(relative: &str) -> String {
    let path = workspace_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Run a tool this test depends on; a missing one fails with what to install.
fn tool(program: &str, args: &[&str], package: &str) -> std::process::Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!("{program} cannot run ({e}): this test needs it (Debian package {package})")
    })
}

// ---------------------------------------------------------------------------------------------
// The Containerfile, as stages of instructions.

struct Stage {
    /// `FROM image AS name`: the name, if any.
    name: Option<String>,
    /// (instruction, arguments), continuation lines joined, comments dropped.
    instructions: Vec<(String, String)>,
}

impl Stage {
    fn all(&self, keyword: &str) -> impl Iterator<Item = &str> {
        self.instructions.iter().filter(move |(k, _)| k == keyword).map(|(_, args)| args.as_str())
    }

    /// Every package named after `apt-get install` in this stage's RUN instructions.
    fn apt_installs(&self) -> BTreeSet<String> {
        let mut packages = BTreeSet::new();
        for run in self.all("RUN") {
            for command in run.split("&&").flat_map(|c| c.split(';')) {
                let words: Vec<&str> = command.split_whitespace().collect();
                let Some(install) =
                    words.windows(2).position(|w| matches!(w[0], "apt-get" | "apt") && w[1] == "install")
                else {
                    continue;
                };
                for word in &words[install + 2..] {
                    if !word.starts_with('-') {
                        // `name=version` and `name:arch` pin a package; the name is what counts.
                        let name = word.split(['=', ':']).next().unwrap_or(word);
                        packages.insert(name.to_string());
                    }
                }
            }
        }
        packages
    }
}

fn containerfile() -> Vec<Stage> {
    let text = read("infra/Containerfile");
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical.iter().filter(|l| !l.trim().is_empty()) {
        let (keyword, args) = line.trim().split_once(char::is_whitespace).unwrap_or((line, ""));
        let keyword = keyword.to_ascii_uppercase();
        let args = args.trim().to_string();
        if keyword == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            stages.push(Stage { name, instructions: Vec::new() });
        } else {
            let stage = stages.last_mut().expect("infra/Containerfile starts with FROM");
            stage.instructions.push((keyword, args));
        }
    }
    assert!(stages.len() >= 2, "infra/Containerfile: expected a build stage and a runtime stage");
    stages
}

fn build_stage(stages: &[Stage]) -> &Stage {
    stages
        .iter()
        .find(|s| s.all("RUN").any(|run| run.contains("make build")))
        .expect("infra/Containerfile: no stage runs `make build`")
}

/// The stage the image runs: the last one.
fn runtime_stage(stages: &[Stage]) -> &Stage {
    stages.last().expect("stages")
}

// ---------------------------------------------------------------------------------------------
// What the binary loads.

/// (soname, resolved path) for every library `ldd` lists; a library it cannot find fails here.
fn loaded_libraries(binary: &str) -> Vec<(String, PathBuf)> {
    let output = tool("ldd", &[binary], "libc-bin");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "ldd {binary}: {}", String::from_utf8_lossy(&output.stderr));
    let missing: Vec<&str> = text.lines().filter(|l| l.contains("not found")).map(str::trim).collect();
    assert!(missing.is_empty(), "{binary} cannot start here, libraries not found: {missing:?}");
    text.lines()
        .filter_map(|line| {
            let (soname, rest) = line.trim().split_once(" => ")?;
            let path = rest.split(" (").next()?.trim();
            (!path.is_empty()).then(|| (soname.to_string(), PathBuf::from(path)))
        })
        .collect()
}

/// The binary's DT_RUNPATH (or DT_RPATH) folders.
fn runpath(binary: &str) -> Vec<PathBuf> {
    let output = tool("readelf", &["-d", binary], "binutils");
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .filter(|l| l.contains("(RUNPATH)") || l.contains("(RPATH)"))
        .filter_map(|l| l.split_once('[').and_then(|(_, rest)| rest.split_once(']')).map(|(p, _)| p))
        .flat_map(|paths| paths.split(':'))
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// The folder a RUNPATH entry belongs to: the Python venv holding it (the nearest folder with a
/// `pyvenv.cfg`), whose CUDA wheels libtorch loads through its own RUNPATH; else the entry itself.
fn provided_by_runpath(entry: &Path) -> PathBuf {
    let resolved = entry.canonicalize().unwrap_or_else(|_| entry.to_path_buf());
    // `.venv/libtorch` is a link into site-packages: look above the unresolved path as well.
    for candidate in [entry, resolved.as_path()] {
        if let Some(venv) = candidate.ancestors().find(|a| a.join("pyvenv.cfg").is_file()) {
            return venv.canonicalize().unwrap_or_else(|_| venv.to_path_buf());
        }
    }
    resolved
}

/// The Debian package that owns `path`. With the merged /usr, dpkg may have registered a file
/// under /lib while ldd reports /usr/lib, or the other way round, and under a link's name rather
/// than its target's: every spelling is tried.
fn debian_package(path: &Path) -> Option<String> {
    let mut candidates = vec![path.to_path_buf()];
    if let Ok(real) = path.canonicalize() {
        candidates.push(real);
    }
    for candidate in candidates.clone() {
        let text = candidate.to_string_lossy().into_owned();
        if let Some(rest) = text.strip_prefix("/usr/lib/") {
            candidates.push(PathBuf::from(format!("/lib/{rest}")));
        } else if let Some(rest) = text.strip_prefix("/lib/") {
            candidates.push(PathBuf::from(format!("/usr/lib/{rest}")));
        }
    }
    candidates.iter().find_map(|candidate| {
        let output = tool("dpkg", &["-S", &candidate.to_string_lossy()], "dpkg");
        if !output.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let package = text.lines().next()?.split(':').next()?.trim();
        (!package.is_empty()).then(|| package.to_string())
    })
}

/// `packages` and everything they depend on (Depends, Pre-Depends), as this machine's dpkg
/// database records it (of alternatives `a | b`, every one), each with the listed package that
/// brings it in.
fn with_dependencies(packages: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut brought_by: BTreeMap<String, String> = packages.iter().map(|p| (p.clone(), p.clone())).collect();
    let mut queue: std::collections::VecDeque<String> = packages.iter().cloned().collect();
    while let Some(package) = queue.pop_front() {
        let root = brought_by[&package].clone();
        let output = tool("dpkg-query", &["-W", "-f=${Depends}, ${Pre-Depends}", &package], "dpkg");
        if !output.status.success() {
            continue; // not installed here: its dependencies are unknown, it still counts itself
        }
        let text = String::from_utf8_lossy(&output.stdout);
        for alternative in text.split([',', '|']) {
            let name = alternative.split_whitespace().next().unwrap_or("");
            let name = name.split(':').next().unwrap_or("");
            if !name.is_empty() && !brought_by.contains_key(name) {
                brought_by.insert(name.to_string(), root.clone());
                queue.push_back(name.to_string());
            }
        }
    }
    brought_by
}

// ---------------------------------------------------------------------------------------------

#[test]
fn runtime_stage_installs_every_system_library_the_binary_loads() {
    let stages = containerfile();
    let installed = runtime_stage(&stages).apt_installs();
    let available = with_dependencies(&installed);
    let venvs: Vec<PathBuf> = runpath(BINARY).iter().map(|entry| provided_by_runpath(entry)).collect();
    assert!(!venvs.is_empty(), "{BINARY} has no RUNPATH: build.rs should bake libtorch's folder in");

    let mut checked = BTreeMap::new();
    let mut unowned = Vec::new();
    // package -> the libraries it would provide.
    let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (soname, path) in loaded_libraries(BINARY) {
        let real = path.canonicalize().unwrap_or_else(|_| path.clone());
        if venvs.iter().any(|venv| real.starts_with(venv)) {
            continue; // libtorch and its CUDA wheels travel with the venv the image copies
        }
        let Some(package) = debian_package(&path) else {
            unowned.push(format!("{soname} ({})", path.display()));
            continue;
        };
        if BASE_PACKAGES.contains(&package.as_str()) {
            continue;
        }
        match available.get(&package) {
            Some(root) if root == &package => checked.insert(soname, package),
            Some(root) => checked.insert(soname, format!("{package}, through {root}")),
            None => {
                missing.entry(package).or_default().push(format!("{soname} ({})", path.display()));
                None
            }
        };
    }
    let problems: Vec<String> = missing
        .iter()
        .map(|(package, libraries)| {
            format!(
                "infra/Containerfile's runtime stage does not install {package}, which provides {} that \
                 {BINARY} loads: add {package} to that stage's apt-get install",
                libraries.join(", ")
            )
        })
        .chain(
            unowned.iter().map(|l| format!("{l} belongs to no Debian package: the image cannot install it")),
        )
        .collect();
    assert!(problems.is_empty(), "{}\n(the runtime stage installs {installed:?})", problems.join("\n"));
    // An empty pass would prove nothing: the binary links Open MPI, so it must have been checked.
    assert!(
        checked.keys().any(|soname| soname.starts_with("libmpi.so")),
        "libmpi was not among the checked libraries {checked:?}"
    );
    eprintln!("system libraries and the packages that provide them in the image: {checked:#?}");
}

#[test]
fn build_stage_installs_what_bootstrap_installs() {
    let stages = containerfile();
    let installed = build_stage(&stages).apt_installs();
    let bootstrap = read("scripts/bootstrap.sh");
    let line = bootstrap
        .lines()
        .find_map(|l| l.trim().strip_prefix("APT_PACKAGES=\""))
        .expect("scripts/bootstrap.sh sets APT_PACKAGES=\"...\"");
    let wanted: Vec<&str> = line
        .trim_end_matches('"')
        .split_whitespace()
        .filter(|word| !word.starts_with('$')) // ${EFFNET_APT_PACKAGES:-}: the caller's extras
        .collect();
    assert!(wanted.contains(&"libopenmpi-dev"), "bootstrap's list changed shape: {line}");
    // Otherwise `make build` (bootstrap, as root) apt-gets them during the image build.
    let missing: Vec<&&str> = wanted.iter().filter(|p| !installed.contains(**p)).collect();
    assert!(
        missing.is_empty(),
        "infra/Containerfile's build stage does not install {missing:?}, which scripts/bootstrap.sh installs \
         on a fresh machine (build stage installs {installed:?})"
    );
}

#[test]
fn runtime_venv_sits_where_the_binary_rpath_points() {
    let root = workspace_root();
    let stages = containerfile();
    let build = build_stage(&stages);
    let workdir = build.all("WORKDIR").last().expect("the build stage sets WORKDIR").to_string();
    let build_name = build.name.clone().expect("the build stage is named (FROM ... AS name)");
    let runtime = runtime_stage(&stages);
    // (from, to) of each COPY --from=<build stage> in the runtime stage.
    let copies: Vec<(String, String)> = runtime
        .all("COPY")
        .filter_map(|args| {
            let words: Vec<&str> = args.split_whitespace().collect();
            let from = words.iter().find_map(|w| w.strip_prefix("--from="))?;
            let paths: Vec<&str> = words.iter().filter(|w| !w.starts_with("--")).copied().collect();
            (from == build_name && paths.len() == 2).then(|| (paths[0].to_string(), paths[1].to_string()))
        })
        .collect();
    assert!(
        copies.iter().any(|(from, _)| from == &format!("{workdir}/target/release/effnet")),
        "the runtime stage copies no {workdir}/target/release/effnet: {copies:?}"
    );
    let text = read("infra/Containerfile");
    let entries = runpath(BINARY);
    let mut checked = 0;
    for entry in &entries {
        let Ok(relative) = entry.strip_prefix(&root) else {
            panic!(
                "{BINARY}'s RUNPATH entry {} lies outside the workspace {}: the image's venv copy cannot provide it",
                entry.display(),
                root.display()
            );
        };
        // Where the same build in the image's build stage points.
        let in_image = format!("{workdir}/{}", relative.display());
        let copy = copies.iter().find(|(from, _)| Path::new(&in_image).starts_with(from));
        let Some((from, to)) = copy else {
            panic!("the runtime stage copies nothing that holds the binary's RUNPATH {in_image}: {copies:?}");
        };
        assert_eq!(
            from, to,
            "the binary's RUNPATH is {in_image}, so the runtime stage must copy {from} to the same path, not {to}"
        );
        assert!(text.contains(&in_image), "infra/Containerfile's comment should name the RUNPATH {in_image}");
        checked += 1;
    }
    assert!(checked > 0, "{BINARY} has no RUNPATH to check: {entries:?}");
}

#[test]
fn dockerignore_keeps_build_outputs_and_venvs_out_of_the_context() {
    let text = read(".dockerignore");
    let patterns: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/').trim_end_matches("/**").trim_end_matches('/'))
        .collect();
    for folder in ["target", ".venv", ".work", ".git"] {
        assert!(patterns.contains(&folder), ".dockerignore does not exclude {folder}/: {patterns:?}");
        assert!(
            !patterns.iter().any(|p| p.strip_prefix('!').is_some_and(|p| p.starts_with(folder))),
            ".dockerignore re-includes part of {folder}/"
        );
    }
}
