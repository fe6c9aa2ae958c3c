//! Resolves a `--model` argument to local files: an existing path as is, else a Hugging Face Hub
//! id looked up in the local Hub cache and downloaded into it when missing (unless offline).
//!
//! The cache layout is the one `huggingface_hub` (Python) and `hf-hub` (Rust) share:
//! `<cache>/models--owner--name/refs/<revision>` holds a commit hash and
//! `<cache>/models--owner--name/snapshots/<hash>/` holds the files, so a model downloaded by
//! `transformers` or `timm` is found without a network.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// The file every model directory must hold.
const CONFIG: &str = "config.json";
/// Weight files in order of preference.
const WEIGHTS: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];
/// Optional HF image-processor settings, fetched when the repo has them.
const PREPROCESSOR: &str = "preprocessor_config.json";
/// The revision used when an id has no `@revision`.
const DEFAULT_REVISION: &str = "main";
/// The forms `resolve_model` accepts, quoted in errors.
const ACCEPTED: &str = "expected an existing local directory or file, or a hub id \
'owner/name' or 'owner/name@revision' (e.g. google/vit-base-patch16-224)";

/// Where and how to look for Hub models; `from_env()` honours HF_HUB_CACHE, HF_HOME (then
/// $HOME/.cache/huggingface), HF_HUB_OFFLINE (1/true/yes/on), HF_ENDPOINT and HF_TOKEN.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The Hub cache directory (the one holding `models--owner--name/`).
    pub cache_dir: PathBuf,
    /// Never touch the network: a model not in the cache is an error.
    pub offline: bool,
    /// The Hub's address, when not the default (a mirror, a private hub).
    pub endpoint: Option<String>,
    /// The access token for gated and private models.
    pub token: Option<String>,
    /// How long the Hub may take to start answering a request (`VITCX_HUB_TIMEOUT` seconds,
    /// default 30): a server that accepts and never answers is an error, not a hang.
    pub timeout: std::time::Duration,
}

/// The default [`HubOptions::timeout`].
pub const HUB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl HubOptions {
    /// Options from the process environment, with the same precedence as `huggingface_hub`.
    pub fn from_env() -> Self {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Options from any environment lookup; `from_env` with the lookup made testable.
    /// Empty values count as unset.
    pub fn from_lookup(env: impl Fn(&str) -> Option<String>) -> Self {
        let var = |key: &str| env(key).filter(|v| !v.trim().is_empty());
        let cache_dir = if let Some(dir) = var("HF_HUB_CACHE") {
            PathBuf::from(dir)
        } else if let Some(home) = var("HF_HOME") {
            PathBuf::from(home).join("hub")
        } else {
            // USERPROFILE covers Windows; with no home at all, fall back to the working directory.
            let home = var("HOME")
                .or_else(|| var("USERPROFILE"))
                .unwrap_or_else(|| ".".to_string());
            PathBuf::from(home)
                .join(".cache")
                .join("huggingface")
                .join("hub")
        };
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        HubOptions {
            cache_dir,
            offline,
            endpoint: var("HF_ENDPOINT"),
            token: var("HF_TOKEN"),
            timeout: var("VITCX_HUB_TIMEOUT")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|t| t.is_finite() && *t > 0.0)
                .map_or(HUB_TIMEOUT, std::time::Duration::from_secs_f64),
        }
    }
}

/// A model argument: an existing local path (directory or file) is used as is; otherwise a Hub id
/// `owner/name` (optionally `owner/name@revision`) is looked up in the cache
/// (`models--owner--name/refs/<rev>` -> `snapshots/<hash>/`), and downloaded (config.json, then
/// model.safetensors or else pytorch_model.bin, and preprocessor_config.json if present) when
/// missing and not offline. Returns the local directory (or file) to load.
pub fn resolve_model(arg: &str, opts: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(arg);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if looks_like_path(arg) {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file or directory; pass an existing model directory \
                 (config.json + model.safetensors) or file, or a hub id 'owner/name'",
            ),
        });
    }
    let id = HubId::parse(arg)?;
    if let Some(dir) = cached_snapshot(&id, &opts.cache_dir) {
        return Ok(dir);
    }
    let hint = "pass a local directory with config.json and model.safetensors";
    if opts.offline {
        return Err(Error::Hub {
            id: arg.to_string(),
            reason: format!(
                "not in the hub cache at {} and HF_HUB_OFFLINE is set; run once without \
                 HF_HUB_OFFLINE=1 to download it, or {hint}",
                opts.cache_dir.display()
            ),
        });
    }
    download(&id, opts).map_err(|reason| Error::Hub {
        id: arg.to_string(),
        reason: format!(
            "download into {} failed: {reason}; check the id and your network (set HF_TOKEN \
             for gated models), or {hint}",
            opts.cache_dir.display()
        ),
    })
}

/// True for arguments that can only mean a local path, so a typo is reported as a missing file
/// instead of as a failed Hub lookup.
fn looks_like_path(arg: &str) -> bool {
    let lower = arg.to_ascii_lowercase();
    let bytes = arg.as_bytes();
    let windows_drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    arg == "."
        || arg == ".."
        || arg.starts_with("./")
        || arg.starts_with("../")
        || arg.starts_with('/')
        || arg.starts_with('~')
        || arg.contains('\\')
        || windows_drive
        || arg.ends_with('/')
        || [".safetensors", ".bin", ".pth", ".pt", ".json", ".npz"]
            .iter()
            .any(|ext| lower.ends_with(ext))
}

/// A parsed Hub model id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HubId {
    /// `owner/name`.
    repo: String,
    /// Branch, tag or commit hash.
    revision: String,
}

impl HubId {
    /// Parses `owner/name` or `owner/name@revision`.
    fn parse(arg: &str) -> Result<Self> {
        let bad = |why: &str| Error::Hub {
            id: arg.to_string(),
            reason: format!("{why}; {ACCEPTED}"),
        };
        let (repo, revision) = match arg.split_once('@') {
            Some((repo, rev)) => (repo, rev),
            None => (arg, DEFAULT_REVISION),
        };
        if revision.is_empty() || revision.contains('@') {
            return Err(bad("empty or repeated '@revision'"));
        }
        if revision.contains("..") || revision.chars().any(|c| c.is_whitespace() || c == '\\') {
            return Err(bad(
                "revision has characters a branch, tag or commit cannot have",
            ));
        }
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2 {
            return Err(bad("not a local path and not of the form 'owner/name'"));
        }
        for part in &parts {
            let valid_chars = part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            let valid_ends = !part.starts_with(['-', '.']) && !part.ends_with(['-', '.']);
            if part.is_empty()
                || part.len() > 96
                || !valid_chars
                || !valid_ends
                || part.contains("..")
            {
                return Err(bad(&format!(
                    "'{part}' is not a valid owner or name (letters, digits, '-', '_', '.')"
                )));
            }
        }
        Ok(HubId {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    /// The `hf-hub` repo handle for this id.
    fn hf_repo(&self) -> Repo {
        Repo::with_revision(self.repo.clone(), RepoType::Model, self.revision.clone())
    }
}

/// The cached snapshot directory of `id` if it holds config.json and a weight file.
fn cached_snapshot(id: &HubId, cache_dir: &Path) -> Option<PathBuf> {
    let repo_dir = cache_dir.join(id.hf_repo().folder_name());
    let snapshots = repo_dir.join("snapshots");
    // A full commit hash names a snapshot directly; branches and tags go through refs/.
    let is_commit = id.revision.len() == 40 && id.revision.chars().all(|c| c.is_ascii_hexdigit());
    let hash = if is_commit && snapshots.join(&id.revision).is_dir() {
        id.revision.clone()
    } else {
        let text = std::fs::read_to_string(repo_dir.join("refs").join(&id.revision)).ok()?;
        text.trim().to_string()
    };
    if hash.is_empty() || hash.contains(['/', '\\']) || hash == "." || hash == ".." {
        return None;
    }
    let dir = snapshots.join(hash);
    let complete = dir.join(CONFIG).is_file() && WEIGHTS.iter().any(|w| dir.join(w).is_file());
    complete.then_some(dir)
}

/// Downloads config, weights and (if present) the preprocessor config into the cache, returning
/// the snapshot directory; the error is a one-line reason.
fn download(id: &HubId, opts: &HubOptions) -> std::result::Result<PathBuf, String> {
    let mut builder = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
        .with_progress(std::io::stderr().is_terminal());
    if let Some(endpoint) = &opts.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    if let Some(token) = &opts.token {
        builder = builder.with_token(Some(token.clone()));
    }
    let api = builder.build().map_err(|e| e.to_string())?;
    let repo = api.repo(id.hf_repo());
    // hf-hub's HTTP client has no timeouts: ask first, with ours, whether the Hub answers.
    probe(&repo.url(CONFIG), opts)?;
    let config = repo
        .get(CONFIG)
        .map_err(|e| format!("fetching {CONFIG}: {e}"))?;
    // The next weights file is tried only when the Hub says this one does not exist; a failed
    // download is an error, not a reason to fetch another format.
    let mut failures = Vec::new();
    let mut have_weights = false;
    for name in WEIGHTS {
        match repo.get(name) {
            Ok(_) => {
                have_weights = true;
                break;
            }
            Err(e) if is_not_found(&e) => failures.push(format!("{name}: {e}")),
            Err(e) => return Err(format!("fetching {name}: {e}")),
        }
    }
    if !have_weights {
        return Err(format!(
            "no weights found ({}); vitcx reads model.safetensors or pytorch_model.bin",
            failures.join("; ")
        ));
    }
    // Optional: many timm repos have none, so "not found" is fine; any other failure would
    // leave the model with default mean/std, so it is an error.
    match repo.get(PREPROCESSOR) {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(format!("fetching {PREPROCESSOR}: {e}")),
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("downloaded {} has no parent directory", config.display()))
}

/// One ranged GET of `url` with connect and read timeouts of `opts.timeout`: any HTTP answer
/// (even an error status, which the download then reports) passes; silence or no connection is
/// an error naming the address.
fn probe(url: &str, opts: &HubOptions) -> std::result::Result<(), String> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(opts.timeout)
        .timeout_read(opts.timeout)
        .try_proxy_from_env(true)
        .build();
    let mut req = agent.get(url).set("Range", "bytes=0-0");
    if let Some(token) = &opts.token {
        req = req.set("Authorization", &format!("Bearer {token}"));
    }
    match req.call() {
        Ok(_) | Err(ureq::Error::Status(..)) => Ok(()),
        Err(ureq::Error::Transport(t)) => Err(format!(
            "no answer from {url} within {:.0} s ({}); set VITCX_HUB_TIMEOUT to wait longer",
            opts.timeout.as_secs_f64(),
            t.kind()
        )),
    }
}

/// Whether the Hub answered "no such file" (HTTP 404).
fn is_not_found(e: &hf_hub::api::sync::ApiError) -> bool {
    matches!(
        e,
        hf_hub::api::sync::ApiError::RequestError(r) if matches!(**r, ureq::Error::Status(404, _))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const HASH: &str = "0123456789abcdef0123456789abcdef01234567";
    const HASH2: &str = "fedcba9876543210fedcba9876543210fedcba98";

    /// Writes a fake cached snapshot `hash` of google/vit-base-patch16-224, referenced by `rev`.
    fn fake_cache(root: &Path, rev: &str, hash: &str, weights: &str) -> PathBuf {
        let repo = root.join("models--google--vit-base-patch16-224");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join(rev), format!("{hash}\n")).unwrap();
        let snap = repo.join("snapshots").join(hash);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join(CONFIG), "{}").unwrap();
        std::fs::write(snap.join(weights), b"x").unwrap();
        snap
    }

    fn offline(dir: &Path) -> HubOptions {
        HubOptions {
            cache_dir: dir.to_path_buf(),
            offline: true,
            endpoint: None,
            token: None,
            timeout: HUB_TIMEOUT,
        }
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn resolves_cached_main() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = fake_cache(tmp.path(), "main", HASH, "model.safetensors");
        let got = resolve_model("google/vit-base-patch16-224", &offline(tmp.path())).unwrap();
        assert_eq!(got, snap);
        assert!(got.join("config.json").is_file());
    }

    #[test]
    fn resolves_cached_without_offline_and_no_network() {
        // A complete cache entry must be used without any download attempt.
        let tmp = tempfile::tempdir().unwrap();
        let snap = fake_cache(tmp.path(), "main", HASH, "pytorch_model.bin");
        let opts = HubOptions {
            cache_dir: tmp.path().to_path_buf(),
            offline: false,
            endpoint: None,
            token: None,
            timeout: HUB_TIMEOUT,
        };
        assert_eq!(
            resolve_model("google/vit-base-patch16-224", &opts).unwrap(),
            snap
        );
    }

    #[test]
    fn resolves_revision_branch_and_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let main = fake_cache(tmp.path(), "main", HASH, "model.safetensors");
        let v2 = fake_cache(tmp.path(), "v2", HASH2, "model.safetensors");
        let opts = offline(tmp.path());
        assert_eq!(
            resolve_model("google/vit-base-patch16-224@v2", &opts).unwrap(),
            v2
        );
        assert_eq!(
            resolve_model(&format!("google/vit-base-patch16-224@{HASH}"), &opts).unwrap(),
            main
        );
        let err = resolve_model("google/vit-base-patch16-224@v3", &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    }

    #[test]
    fn incomplete_snapshot_is_not_cached() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = fake_cache(tmp.path(), "main", HASH, "model.safetensors");
        std::fs::remove_file(snap.join("model.safetensors")).unwrap();
        assert!(resolve_model("google/vit-base-patch16-224", &offline(tmp.path())).is_err());
    }

    #[test]
    fn offline_missing_says_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let err = resolve_model("google/vit-base-patch16-224", &offline(tmp.path())).unwrap_err();
        assert!(matches!(err, Error::Hub { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");
        assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
        assert!(msg.contains("google/vit-base-patch16-224"), "{msg}");
        assert!(msg.contains("local directory"), "{msg}");
    }

    #[test]
    fn local_dir_and_file_pass_through() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("model.safetensors");
        std::fs::write(&file, b"x").unwrap();
        let opts = offline(&tmp.path().join("no-cache"));
        let dir_arg = tmp.path().to_str().unwrap();
        assert_eq!(resolve_model(dir_arg, &opts).unwrap(), tmp.path());
        assert_eq!(resolve_model(file.to_str().unwrap(), &opts).unwrap(), file);
        // The crate's own fixture directory, given relative to the manifest.
        let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/vit_timm");
        assert_eq!(resolve_model(golden, &opts).unwrap(), Path::new(golden));
    }

    #[test]
    fn missing_local_paths_are_io_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = offline(tmp.path());
        for arg in [
            "./x",
            "../x",
            "/definitely/not/here",
            "x.safetensors",
            "dir/model.bin",
            "C:\\models\\vit",
            "no-such-models/",
        ] {
            let err = resolve_model(arg, &opts).unwrap_err();
            assert!(matches!(err, Error::Io { .. }), "{arg}: {err:?}");
            assert!(
                err.to_string().contains("no such file or directory"),
                "{arg}: {err}"
            );
        }
    }

    #[test]
    fn bad_id_forms_name_accepted_forms() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = offline(tmp.path());
        for arg in [
            "vit-base",
            "a/b/c",
            "owner/.hidden",
            "owner/name@",
            "owner/na me",
            "owner/name@a@b",
            "-owner/name",
            "owner/name@../../x",
        ] {
            let err = resolve_model(arg, &opts).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::Hub { .. }), "{arg}: {err:?}");
            assert!(msg.contains("'owner/name'"), "{arg}: {msg}");
            assert!(msg.contains("owner/name@revision"), "{arg}: {msg}");
        }
    }

    #[test]
    fn parse_id_forms() {
        assert_eq!(
            HubId::parse("google/vit-base-patch16-224").unwrap(),
            HubId {
                repo: "google/vit-base-patch16-224".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            HubId::parse("timm/vit_tiny_patch16_224.augreg_in21k@refs/pr/3").unwrap(),
            HubId {
                repo: "timm/vit_tiny_patch16_224.augreg_in21k".into(),
                revision: "refs/pr/3".into()
            }
        );
    }

    #[test]
    fn env_precedence_and_offline_values() {
        let o = HubOptions::from_lookup(env(&[
            ("HF_HUB_CACHE", "/c"),
            ("HF_HOME", "/h"),
            ("HOME", "/home/u"),
        ]));
        assert_eq!(o.cache_dir, PathBuf::from("/c"));
        assert!(!o.offline);
        let o = HubOptions::from_lookup(env(&[("HF_HOME", "/h"), ("HOME", "/home/u")]));
        assert_eq!(o.cache_dir, PathBuf::from("/h/hub"));
        let o = HubOptions::from_lookup(env(&[("HF_HUB_CACHE", ""), ("HOME", "/home/u")]));
        assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        for (v, want) in [
            ("1", true),
            ("true", true),
            ("YES", true),
            ("On", true),
            ("0", false),
            ("false", false),
            ("", false),
            ("nah", false),
        ] {
            let o = HubOptions::from_lookup(env(&[("HF_HUB_OFFLINE", v), ("HOME", "/u")]));
            assert_eq!(o.offline, want, "HF_HUB_OFFLINE={v:?}");
        }
    }

    /// A Hub on loopback serving `files` (path after `/resolve/main/` -> HTTP status and body)
    /// as the Hub does: ranged GETs answered 206 with `ETag`, `X-Repo-Commit` and
    /// `Content-Range`. Returns its address.
    fn fake_hub(files: HashMap<&'static str, (u16, Vec<u8>)>) -> String {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let files = std::sync::Arc::new(files);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let files = files.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut out = stream;
                    loop {
                        let mut head = Vec::new();
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            head.push(line);
                        }
                        let path = head[0].split_whitespace().nth(1).unwrap_or("").to_string();
                        let file = path.rsplit("/resolve/main/").next().unwrap_or("");
                        let range = head.iter().find_map(|h| {
                            let (k, v) = h.split_once(':')?;
                            let v = v.trim().strip_prefix("bytes=")?;
                            let (a, b) = v.split_once('-')?;
                            (k.eq_ignore_ascii_case("range"))
                                .then(|| (a.parse::<usize>().ok(), b.parse::<usize>().ok()))
                        });
                        let reply = match files.get(file) {
                            Some((200, body)) => {
                                let (a, b) = match range {
                                    Some((Some(a), Some(b))) => (a, b.min(body.len() - 1)),
                                    Some((Some(a), None)) => (a, body.len() - 1),
                                    _ => (0, body.len() - 1),
                                };
                                let part = &body[a..=b];
                                let mut r = format!(
                                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{}\r\nETag: \"e-{file}\"\r\nX-Repo-Commit: {HASH}\r\n\r\n",
                                    part.len(),
                                    body.len()
                                )
                                .into_bytes();
                                r.extend_from_slice(part);
                                r
                            }
                            Some((status, _)) => {
                                format!("HTTP/1.1 {status} Error\r\nContent-Length: 0\r\n\r\n")
                                    .into_bytes()
                            }
                            None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
                                .to_string()
                                .into_bytes(),
                        };
                        if out.write_all(&reply).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn online(cache: &Path, endpoint: String) -> HubOptions {
        HubOptions {
            cache_dir: cache.to_path_buf(),
            offline: false,
            endpoint: Some(endpoint),
            token: None,
            timeout: HUB_TIMEOUT,
        }
    }

    #[test]
    fn downloads_into_the_cache_and_an_absent_preprocessor_is_fine() {
        let files = HashMap::from([
            (CONFIG, (200, b"{\"model_type\": \"vit\"}".to_vec())),
            ("model.safetensors", (404, vec![])),
            ("pytorch_model.bin", (200, b"weights".to_vec())),
        ]);
        let tmp = tempfile::tempdir().unwrap();
        let opts = online(tmp.path(), fake_hub(files));
        let dir = resolve_model("google/vit-base-patch16-224", &opts).unwrap();
        assert_eq!(
            std::fs::read(dir.join("pytorch_model.bin")).unwrap(),
            b"weights"
        );
        assert!(dir.join(CONFIG).is_file());
        assert!(!dir.join(PREPROCESSOR).exists());
        // Now cached: found offline.
        let again = resolve_model("google/vit-base-patch16-224", &offline(tmp.path())).unwrap();
        assert_eq!(again, dir);
    }

    #[test]
    fn a_failed_preprocessor_download_is_an_error_not_default_mean_std() {
        let files = HashMap::from([
            (CONFIG, (200, b"{}".to_vec())),
            ("model.safetensors", (200, b"w".to_vec())),
            (PREPROCESSOR, (500, vec![])),
        ]);
        let tmp = tempfile::tempdir().unwrap();
        let opts = online(tmp.path(), fake_hub(files));
        let err = resolve_model("google/vit-base-patch16-224", &opts).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Hub { .. }), "{err:?}");
        assert!(
            msg.contains("preprocessor_config.json") && msg.contains("500"),
            "{msg}"
        );
        // A failed weights download is an error too, not a reason to fetch the other format.
        let files = HashMap::from([
            (CONFIG, (200, b"{}".to_vec())),
            ("model.safetensors", (503, vec![])),
            ("pytorch_model.bin", (200, b"w".to_vec())),
        ]);
        let tmp = tempfile::tempdir().unwrap();
        let opts = online(tmp.path(), fake_hub(files));
        let msg = resolve_model("google/vit-base-patch16-224", &opts)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("fetching model.safetensors") && msg.contains("503"),
            "{msg}"
        );
        // And a model with neither weights file says so.
        let files = HashMap::from([(CONFIG, (200, b"{}".to_vec()))]);
        let tmp = tempfile::tempdir().unwrap();
        let opts = online(tmp.path(), fake_hub(files));
        let msg = resolve_model("google/vit-base-patch16-224", &opts)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no weights found"), "{msg}");
    }

    #[test]
    fn a_hub_that_never_answers_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        // Accept and hold every connection without a byte in reply.
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                held.push(stream);
            }
        });
        let tmp = tempfile::tempdir().unwrap();
        let mut opts = online(tmp.path(), addr);
        opts.timeout = std::time::Duration::from_millis(500);
        let t = std::time::Instant::now();
        let e = resolve_model("google/vit-base-patch16-224", &opts)
            .unwrap_err()
            .to_string();
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            t.elapsed()
        );
        assert!(
            e.contains("no answer from") && e.contains("config.json"),
            "{e}"
        );
    }
}
