//! How the CLI's agent commands show tasks to people: a task's fields, its
//! outcome, tables, times in UTC and relative to now.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// A time in milliseconds since the Unix epoch, as RFC 3339 in UTC.
pub(super) fn timestamp(ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// How far `ms` (since the Unix epoch) is from now: `in 1m 30s`, `now`, or
/// `5s ago`.
pub(super) fn from_now(ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let seconds = |ms: u64| humantime::format_duration(Duration::from_secs(ms.div_ceil(1000)));
    match ms.cmp(&now) {
        std::cmp::Ordering::Greater => format!("in {}", seconds(ms - now)),
        std::cmp::Ordering::Equal => "now".to_string(),
        std::cmp::Ordering::Less => format!("{} ago", seconds(now - ms)),
    }
}

/// The exit code `submit --wait` and `wait` use for a task: its own exit
/// code when it ran to an end, 1 when it failed otherwise.
pub(super) fn exit_code(view: &Value) -> i32 {
    if let Some(code) = view["result"]["exit_code"].as_i64() {
        return code as i32;
    }
    // A failure's reason says "exited with code N" when the program ran.
    view["error"]
        .as_str()
        .and_then(|error| error.split("exited with code ").nth(1))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|code| code.parse().ok())
        .unwrap_or(1)
}

/// A JSON value as text for a terminal: a string as itself, anything else
/// as JSON, with control characters escaped (`\u{1b}`, `\n`): whoever
/// submits a task chooses its command, and an escape sequence printed raw
/// could erase or rewrite the lines another user reads.
pub(super) fn text(value: &Value) -> String {
    let raw = value
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| value.to_string());
    if !raw.chars().any(char::is_control) {
        return raw;
    }
    raw.chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}

/// What a task runs as a command line: a process's program and arguments,
/// or a Kubernetes task's image, command and arguments.
pub(super) fn command_line(task: &Value) -> String {
    let properties = &task["properties"];
    let mut words = Vec::new();
    if let Some(kubernetes) = properties.get("kubernetes") {
        words.push(format!("[{}]", text(&kubernetes["image"])));
        for field in ["command", "args"] {
            words.extend(kubernetes[field].as_array().into_iter().flatten().map(text));
        }
    } else {
        let process = &properties["process"];
        words.push(text(&process["program"]));
        words.extend(process["args"].as_array().into_iter().flatten().map(text));
    }
    let line = words.join(" ");
    if line.chars().count() > 60 {
        format!("{}…", line.chars().take(59).collect::<String>())
    } else {
        line
    }
}

/// Print how a task ended: done with its exit code, killed, or failed and why.
pub(super) fn print_outcome(view: &Value) {
    match view["state"].as_str() {
        Some("done") => println!("{} done (exit code {})", text(&view["id"]), exit_code(view)),
        Some("killed") => println!("{} killed", text(&view["id"])),
        _ => println!(
            "{} failed: {}",
            text(&view["id"]),
            match &view["error"] {
                Value::Null => "(no reason given)".to_string(),
                error => text(error),
            }
        ),
    }
}

/// Print a task's fields, one per line, for `show`.
pub(super) fn print_task(view: &Value) {
    let mut state = text(&view["state"]);
    if let Some(until) = view["sleeping_until_ms"].as_u64() {
        state.push_str(&format!(
            " until {} ({})",
            timestamp(until),
            from_now(until)
        ));
    }
    let mut rows = vec![
        ("id", text(&view["id"])),
        ("state", state),
        ("group", text(&view["group"])),
        ("command", command_line(view)),
    ];
    let process = &view["properties"]["process"];
    if let Some(env) = process["env"].as_object() {
        let pairs: Vec<String> = env
            .iter()
            .map(|(name, value)| format!("{name}={}", text(value)))
            .collect();
        rows.push(("env", pairs.join(" ")));
    }
    if let Some(timeout) = process["timeout_ms"].as_u64() {
        let timeout = humantime::format_duration(Duration::from_millis(timeout));
        rows.push(("timeout", format!("{timeout} per attempt")));
    }
    for field in ["node", "epoch", "error"] {
        if !view[field].is_null() {
            rows.push((field, text(&view[field])));
        }
    }
    if !view["result"].is_null() {
        rows.push(("exit code", view["result"]["exit_code"].to_string()));
        rows.push(("attempts", view["result"]["attempts"].to_string()));
    }
    if let Some(last) = view["errors"].as_array().and_then(|e| e.last()) {
        let count = view["errors"].as_array().map_or(0, Vec::len);
        let at = last["at_ms"]
            .as_u64()
            .map(|at| format!(" at {}", timestamp(at)))
            .unwrap_or_default();
        rows.push((
            "errors",
            format!("{count} recent; the last{at}: {}", text(&last["message"])),
        ));
    }
    for (name, value) in rows {
        println!("{:<10} {value}", format!("{name}:"));
    }
}

/// Columns padded to their widest cell.
pub(super) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_utc_and_relative_to_now() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(timestamp(1_700_000_000_500), "2023-11-14T22:13:20Z");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert_eq!(from_now(now + 90_000), "in 1m 30s");
        assert!(from_now(now - 60_000).ends_with(" ago"));
    }

    #[test]
    fn control_characters_a_submitter_chose_are_shown_escaped() {
        // Erase the line, go back to its start, print a row of one's own.
        let task = serde_json::json!({
            "properties": {"process": {
                "program": "sh",
                "args": ["-c", "true\u{1b}[2K\rfake-task  done"],
            }},
        });
        assert_eq!(
            command_line(&task),
            "sh -c true\\u{1b}[2K\\rfake-task  done"
        );
        assert_eq!(text(&serde_json::json!("a\nb\tc")), "a\\nb\\tc");
        assert_eq!(text(&serde_json::json!("plain é")), "plain é");
        assert_eq!(text(&serde_json::json!(3)), "3");
    }
}
