//! Output formats and error reporting shared by every command.

use std::io::Write;

use beemesh_manifest::Invalid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// For scripts: one JSON document on stdout.
    Json,
}

/// Prints a JSON value on stdout.
pub fn json(value: &serde_json::Value) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, value)?;
    writeln!(stdout)?;
    Ok(())
}

/// Prints a failure: one line with the reason (the whole context chain), then, when the cause
/// is an invalid document with several problems, every problem on its own line.
pub fn report_error(e: &anyhow::Error) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "beemesh: error: {e:#}");
    if let Some(invalid) = e.chain().find_map(|c| c.downcast_ref::<Invalid>())
        && invalid.diagnostics.len() > 1
    {
        for d in &invalid.diagnostics {
            let _ = writeln!(stderr, "  {d}");
        }
    }
}
