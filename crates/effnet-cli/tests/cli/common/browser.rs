//! A real browser for the report and status-page tests: headless Chromium (Debian's `chromium`)
//! opens a page from disk or over HTTP, takes a screenshot and prints the DOM; every console
//! message it logs is collected.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PageCheck {
    /// The DOM after load (`--dump-dom`).
    pub dom: String,
    /// Console messages (errors, warnings, CSP violations such as a blocked fetch).
    pub console: Vec<String>,
    pub screenshot: effnet_vision::Image,
}

/// The browser binary: `EFFNET_CHROMIUM`, else `chromium` on PATH. Missing is a failure with
/// the fix, not a skip.
pub fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("EFFNET_CHROMIUM") {
        return PathBuf::from(path);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let candidate = dir.join("chromium");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "headless Chromium is needed for the report tests: apt install chromium (scripts/bootstrap.sh does, as root), or set EFFNET_CHROMIUM"
    );
}

fn run(url: &str, args: &[&str], profile: &Path) -> std::process::Output {
    Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium starts")
}

/// Open `page` in headless Chromium: screenshot at `width`×`height`, DOM, console messages.
pub fn open(page: &Path, width: u32, height: u32) -> PageCheck {
    open_url(&format!("file://{}", page.canonicalize().unwrap().display()), width, height)
}

/// [`open`] for a URL (a page served over HTTP).
pub fn open_url(page: &str, width: u32, height: u32) -> PageCheck {
    let scratch = tempfile::tempdir().unwrap();
    let png = scratch.path().join("screenshot.png");
    let shot = run(
        page,
        &[&format!("--screenshot={}", png.display()), &format!("--window-size={width},{height}")],
        &scratch.path().join("profile-1"),
    );
    assert!(png.is_file(), "chromium wrote no screenshot: {}", String::from_utf8_lossy(&shot.stderr));
    let dump = run(page, &["--dump-dom"], &scratch.path().join("profile-2"));
    assert!(dump.status.success(), "chromium --dump-dom failed: {}", String::from_utf8_lossy(&dump.stderr));
    let mut console = Vec::new();
    for output in [&shot, &dump] {
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            if line.contains(":CONSOLE") {
                console.push(line.to_string());
            }
        }
    }
    let screenshot = effnet_vision::decode::decode(&std::fs::read(&png).unwrap()).expect("a PNG screenshot");
    PageCheck { dom: String::from_utf8_lossy(&dump.stdout).into_owned(), console, screenshot }
}

impl PageCheck {
    /// Pixels that are not (near) white.
    pub fn ink_pixels(&self) -> usize {
        self.pixels().filter(|p| p.iter().any(|&c| c < 235)).count()
    }

    /// Pixels within `tolerance` of an RGB colour.
    pub fn pixels_of(&self, rgb: [u8; 3], tolerance: u8) -> usize {
        self.pixels().filter(|p| p.iter().zip(rgb).all(|(&c, want)| c.abs_diff(want) <= tolerance)).count()
    }

    fn pixels(&self) -> impl Iterator<Item = &[u8]> {
        let channels = self.screenshot.channels as usize;
        self.screenshot.data.chunks(channels).map(|p| &p[..3.min(p.len())])
    }
}
