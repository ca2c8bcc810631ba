//! A real browser for the dashboard's tests: headless Chromium driven through chromedriver
//! (WebDriver), each test with its own chromedriver on a free loopback port and its own
//! profile directory, both gone when the [`Browser`] is dropped.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use thirtyfour::common::capabilities::chromium::ChromiumLikeCapabilities;
use thirtyfour::prelude::*;
use thirtyfour::LoggingPrefsLogLevel;

/// How long a page condition may take to hold: an upper bound for a loaded CI machine, not a
/// timing the tests depend on.
pub const PATIENCE: Duration = Duration::from_secs(90);

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver (and the Chromium it starts) in a process group of their own, killed as a
/// group when dropped, so a failing test leaves no browser behind.
struct DriverProcess {
    child: Child,
}

impl Drop for DriverProcess {
    fn drop(&mut self) {
        let group = self.child.id() as i32;
        // SAFETY: kill(2) with the negative id of the process group this guard created.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

pub struct Browser {
    pub driver: WebDriver,
    /// Where the dashboard is (`https://localhost:PORT`).
    pub base: String,
    // Dropped after the session: the process group, then the profile directory.
    _process: DriverProcess,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session against `base`.
    pub async fn start(base: &str) -> Self {
        let port = crate::free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts (apt-get install chromium chromium-driver)");
        let process = DriverProcess { child };
        let url = format!("http://127.0.0.1:{port}");
        let status = reqwest::Client::new();
        let ready = crate::eventually(PATIENCE, || async {
            status
                .get(format!("{url}/status"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        assert!(ready, "chromedriver did not answer on {url}");
        let profile = crate::open_tempdir();
        let mut caps = DesiredCapabilities::chrome();
        caps.set_binary(CHROMIUM).expect("binary");
        for arg in [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
            // The test control plane's certificate is issued by its own throwaway CA.
            "--ignore-certificate-errors",
        ] {
            caps.add_arg(arg).expect("arg");
        }
        caps.add_arg(&format!("--user-data-dir={}", profile.path().display()))
            .expect("arg");
        // Console messages and CSP violations land in the browser log the tests read.
        caps.set_logging_prefs("browser", LoggingPrefsLogLevel::All)
            .expect("logging");
        let driver = WebDriver::new(url, caps).await.expect("a browser session");
        Self {
            driver,
            base: base.to_owned(),
            _process: process,
            _profile: profile,
        }
    }

    pub async fn open(&self, path: &str) {
        self.driver
            .goto(format!("{}{path}", self.base))
            .await
            .expect("navigate");
    }

    /// The path of the page the browser shows.
    pub async fn path(&self) -> String {
        self.driver
            .current_url()
            .await
            .expect("url")
            .path()
            .to_owned()
    }

    /// The element `css` once it exists.
    pub async fn wait_for(&self, css: &str) -> WebElement {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(e) = self.driver.find(By::Css(css)).await {
                return e;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{css} did not appear on {}",
                self.path().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the text of `css` satisfies `check`; returns it.
    pub async fn wait_text(&self, css: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut last = String::new();
        loop {
            if let Ok(e) = self.driver.find(By::Css(css)).await {
                if let Ok(text) = e.text().await {
                    if check(&text) {
                        return text;
                    }
                    last = text;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{css} never held the expected text; last: {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the browser shows `path`.
    pub async fn wait_path(&self, path: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let now = self.path().await;
            if now == path {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the browser stayed on {now}, not {path}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn fill(&self, css: &str, text: &str) {
        let field = self.wait_for(css).await;
        field.clear().await.expect("clear");
        field.send_keys(text).await.expect("type");
    }

    pub async fn click(&self, css: &str) {
        self.wait_for(css).await.click().await.expect("click");
    }

    /// The page's HTML as the browser holds it now.
    pub async fn source(&self) -> String {
        self.driver.source().await.expect("source")
    }

    /// Whether `css` is on the page now.
    pub async fn has(&self, css: &str) -> bool {
        !self
            .driver
            .find_all(By::Css(css))
            .await
            .expect("query")
            .is_empty()
    }

    /// The session cookie's value as `name=value`, as the browser holds it.
    pub async fn session_cookie(&self) -> String {
        let c = self
            .driver
            .get_named_cookie("sensei_session")
            .await
            .expect("the browser holds a session cookie");
        format!("{}={}", c.name, c.value)
    }

    /// Browser log messages about the Content-Security-Policy since the last call.
    pub async fn csp_violations(&self) -> Vec<String> {
        self.driver
            .get_log("browser")
            .await
            .expect("browser log")
            .into_iter()
            .map(|e| e.message)
            .filter(|m| {
                m.contains("Content Security Policy") || m.contains("Content-Security-Policy")
            })
            .collect()
    }

    /// The serious and critical accessibility violations axe-core finds on the page, one
    /// line each (rule, impact, the elements). axe-core's source (pinned in
    /// `tests/node/package.json`) is injected through WebDriver, which the page's
    /// Content-Security-Policy does not govern: the policy stays as strict as served.
    pub async fn accessibility_violations(&self) -> Vec<String> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("node/node_modules/axe-core/axe.min.js");
        let axe = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run `npm ci --prefix tests/node` (./test does)",
                path.display()
            )
        });
        self.driver
            .execute(&axe, vec![])
            .await
            .expect("inject axe-core");
        let found = self
            .driver
            .execute_async(
                r#"var done = arguments[arguments.length - 1];
                axe.run(document, { resultTypes: ["violations"] }).then(function (r) {
                  done(r.violations
                    .filter(function (v) { return v.impact === "serious" || v.impact === "critical"; })
                    .map(function (v) {
                      return v.id + " (" + v.impact + "): " + v.help + " at " +
                        v.nodes.map(function (n) { return n.target.join(" "); }).join(", ");
                    }));
                }, function (e) { done(["axe failed: " + e]); });"#,
                vec![],
            )
            .await
            .expect("run axe-core");
        serde_json::from_value(found.json().clone()).expect("a list of violations")
    }

    /// Walks the page with the Tab key: every visible link, button and field must take the
    /// focus in turn, each with a visible focus indicator. Returns what went wrong.
    pub async fn keyboard_problems(&self) -> Vec<String> {
        let count = self
            .driver
            .execute(
                r#"var all = Array.prototype.filter.call(
                  document.querySelectorAll("a[href], button, input:not([type=hidden]), select, textarea, [tabindex]:not([tabindex='-1'])"),
                  function (e) { return !e.disabled && e.getClientRects().length > 0 && getComputedStyle(e).visibility !== "hidden"; });
                all.forEach(function (e, i) { e.setAttribute("data-kbd", String(i)); });
                document.activeElement && document.activeElement.blur();
                window.scrollTo(0, 0);
                return all.length;"#,
                vec![],
            )
            .await
            .expect("list the focusable elements")
            .json()
            .as_u64()
            .expect("a count");
        // Round the page once: until the first element reached is reached again. A radio
        // group takes one stop, a date field one per part, so the presses are bounded by
        // a generous multiple of the elements, not by their number.
        let mut reached = std::collections::BTreeSet::new();
        let mut first = None;
        let mut problems = Vec::new();
        for _ in 0..count * 8 + 8 {
            self.driver
                .action_chain()
                .send_keys(Key::Tab)
                .perform()
                .await
                .expect("press Tab");
            let focused = self
                .driver
                .execute(
                    r#"var e = document.activeElement;
                    if (!e || e === document.body) { return null; }
                    var s = getComputedStyle(e);
                    var ring = (s.outlineStyle !== "none" && parseFloat(s.outlineWidth) > 0) || s.boxShadow !== "none";
                    return [e.getAttribute("data-kbd"), ring, e.outerHTML.slice(0, 120)];"#,
                    vec![],
                )
                .await
                .expect("the focused element");
            let Some([index, ring, html]) =
                serde_json::from_value::<Option<[serde_json::Value; 3]>>(focused.json().clone())
                    .expect("focus")
            else {
                continue;
            };
            let problem = format!("no visible focus on {html}");
            if ring != serde_json::Value::Bool(true) && !problems.contains(&problem) {
                problems.push(problem);
            }
            let Some(i) = index.as_str().and_then(|i| i.parse::<u64>().ok()) else {
                continue;
            };
            if first == Some(i) && reached.len() > 1 {
                break;
            }
            first.get_or_insert(i);
            reached.insert(i);
        }
        let missed: Vec<u64> = (0..count).filter(|i| !reached.contains(i)).collect();
        for i in missed {
            let html = self
                .driver
                .execute(
                    &format!(
                        r#"var e = document.querySelector("[data-kbd='{i}']");
                    return e.type === "radio" && !e.checked ? "" : e.outerHTML.slice(0, 120);"#
                    ),
                    vec![],
                )
                .await
                .expect("the element missed")
                .json()
                .as_str()
                .unwrap_or_default()
                .to_owned();
            // An unchecked radio button is reached with the arrow keys, not Tab.
            if !html.is_empty() {
                problems.push(format!("Tab never reaches {html}"));
            }
        }
        problems
    }

    /// Saves a screenshot of the page as `docs/dashboard/{name}.png` when
    /// `SENSEI_DASHBOARD_SCREENSHOTS=1` (so an ordinary test run leaves the tree alone).
    pub async fn screenshot(&self, name: &str) {
        if std::env::var_os("SENSEI_DASHBOARD_SCREENSHOTS").is_none() {
            return;
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard");
        std::fs::create_dir_all(&dir).expect("screenshot directory");
        let png = self.driver.screenshot_as_png().await.expect("screenshot");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
    }

    /// Sends a Chrome DevTools Protocol command to the page's tab (chromedriver's
    /// `goog/cdp/execute`), e.g. to give it a virtual WebAuthn authenticator.
    pub async fn cdp(&self, command: &str, params: serde_json::Value) -> serde_json::Value {
        self.driver
            .cdp()
            .send_raw(command, params)
            .await
            .unwrap_or_else(|e| panic!("{command}: {e}"))
    }

    /// Ends the browser session (the guard kills the processes either way).
    pub async fn close(self) {
        let Self {
            driver,
            _process,
            _profile,
            ..
        } = self;
        let _ = driver.quit().await;
        drop(_process);
    }
}
