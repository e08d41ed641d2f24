//! Small helpers around external programs and growing log files.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

/// Finds an executable on `PATH`.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Runs `command` to completion with captured output; fails with the program's stderr when
/// it cannot start or exits non-zero. `what` names the step for the error message.
pub fn output_checked(command: &mut Command, what: &str) -> Result<Output> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {what} ({})", describe(command)))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        anyhow::bail!(
            "{what} failed ({}), command: {}\n{}{}",
            output.status,
            describe(command),
            last_lines(&stdout, 20),
            last_lines(&stderr, 30)
        );
    }
    Ok(output)
}

/// Runs `command` with inherited stdout/stderr (the user sees its output live).
pub fn status_checked(command: &mut Command, what: &str) -> Result<()> {
    let status = command.status().with_context(|| format!("cannot start {what} ({})", describe(command)))?;
    if !status.success() {
        anyhow::bail!("{what} failed ({status}), command: {}", describe(command));
    }
    Ok(())
}

/// The command line of `command`, for messages.
pub fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains([' ', '"', '\'']) {
            text.push_str(&format!(" '{arg}'"));
        } else {
            text.push(' ');
            text.push_str(&arg);
        }
    }
    text
}

/// The last `count` lines of `text`, each ending in a newline (empty when `text` is).
pub fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(count);
    lines[start..].iter().map(|line| format!("{line}\n")).collect()
}

/// Seconds with one decimal, for progress lines.
pub fn secs(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

/// Follows a file another process appends to, handing out complete lines as they arrive
/// (like `tail -f`). The file need not exist yet.
#[derive(Debug)]
pub struct LogTail {
    path: PathBuf,
    file: Option<File>,
    pending: Vec<u8>,
    text: String,
}

impl LogTail {
    pub fn new(path: PathBuf) -> Self {
        LogTail { path, file: None, pending: Vec::new(), text: String::new() }
    }

    /// Reads what was appended since the last call and returns the newly completed lines
    /// (without their line ends). Everything read is also kept for [`LogTail::text`].
    pub fn poll(&mut self) -> Vec<String> {
        if self.file.is_none() {
            self.file = File::open(&self.path).ok();
        }
        let Some(file) = self.file.as_mut() else { return Vec::new() };
        let mut chunk = Vec::new();
        // A read error (e.g. the file was replaced) just means no new text this time.
        if file.read_to_end(&mut chunk).is_err() {
            let _ = file.seek(SeekFrom::End(0));
        }
        self.pending.extend_from_slice(&chunk);
        let mut lines = Vec::new();
        while let Some(end) = self.pending.iter().position(|&byte| byte == b'\n') {
            let raw: Vec<u8> = self.pending.drain(..=end).collect();
            let line = clean_line(&raw[..raw.len() - 1]);
            self.text.push_str(&line);
            self.text.push('\n');
            lines.push(line);
        }
        lines
    }

    /// Reads the rest and returns it, including a last line without a line end.
    pub fn finish(&mut self) -> Vec<String> {
        let mut lines = self.poll();
        if !self.pending.is_empty() {
            let line = clean_line(&self.pending);
            self.pending.clear();
            self.text.push_str(&line);
            self.text.push('\n');
            lines.push(line);
        }
        lines
    }

    /// Everything read so far, as complete lines.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Turns raw serial bytes into a printable line: lossy UTF-8, no carriage returns, and
/// control characters other than tab shown as `\xNN` so they cannot upset the terminal.
fn clean_line(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut line = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '\r' => {}
            '\t' => line.push(ch),
            c if c.is_control() => line.push_str(&format!("\\x{:02x}", c as u32)),
            c => line.push(c),
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tail_returns_complete_lines_as_they_arrive() {
        let dir = std::env::temp_dir().join(format!("xtask-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("serial.txt");
        let _ = std::fs::remove_file(&path);
        let mut tail = LogTail::new(path.clone());
        assert!(tail.poll().is_empty(), "a missing file has no lines");
        let mut file = File::create(&path).expect("create");
        file.write_all(b"first\r\nsec").expect("write");
        assert_eq!(tail.poll(), vec!["first".to_string()]);
        file.write_all(b"ond\n\x1b[0mthird").expect("write");
        assert_eq!(tail.poll(), vec!["second".to_string()]);
        assert_eq!(tail.finish(), vec!["\\x1b[0mthird".to_string()]);
        assert_eq!(tail.text(), "first\nsecond\n\\x1b[0mthird\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn last_lines_keeps_the_tail() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(last_lines("", 5), "");
    }
}
