//! A progress spinner on stderr while create-and-boot waits. It runs on its own thread so it
//! keeps turning while the runtime is busy, and it never draws when stderr is not a terminal
//! (logs and CI output stay clean).

use std::io::{IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct Spinner {
    shared: Option<(Arc<Mutex<String>>, Arc<AtomicBool>)>,
    thread: Option<JoinHandle<()>>,
}

impl Spinner {
    /// A spinner showing `message`; inert unless stderr is a terminal and `enabled`.
    pub fn start(enabled: bool, message: &str) -> Self {
        if !enabled || !std::io::stderr().is_terminal() {
            return Spinner {
                shared: None,
                thread: None,
            };
        }
        let text = Arc::new(Mutex::new(message.to_owned()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (text.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            const FRAMES: [&str; 10] = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];
            let started = std::time::Instant::now();
            let mut i = 0;
            while !s.load(Ordering::Relaxed) {
                let msg = t.lock().map(|m| m.clone()).unwrap_or_default();
                let secs = started.elapsed().as_secs_f32();
                let mut err = std::io::stderr().lock();
                // \r + erase line: redraw in place.
                let _ = write!(
                    err,
                    "\r\x1b[2K{} {msg} ({secs:.1}s)",
                    FRAMES[i % FRAMES.len()]
                );
                let _ = err.flush();
                drop(err);
                i += 1;
                std::thread::sleep(Duration::from_millis(80));
            }
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        });
        Spinner {
            shared: Some((text, stop)),
            thread: Some(thread),
        }
    }

    pub fn set(&self, message: &str) {
        if let Some((text, _)) = &self.shared {
            if let Ok(mut m) = text.lock() {
                *m = message.to_owned();
            }
        }
    }

    /// Stops and erases the spinner; output printed afterwards starts on a clean line.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some((_, stop)) = &self.shared {
            stop.store(true, Ordering::Relaxed);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        // Also on an error path, so the error line is not glued to a spinner frame.
        self.stop();
    }
}
