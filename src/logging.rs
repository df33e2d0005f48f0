//! Log output: `tracing` to stderr, human-readable text or JSON lines (`log.format`), filtered
//! by `log.filter`. Tokens, secrets and API keys are never recorded as fields.

use tracing_subscriber::EnvFilter;

use crate::settings::{Log, LogFormat};

/// Installs the global subscriber; a second call (tests) leaves the first in place.
pub fn init(log: &Log) {
    let filter = EnvFilter::try_new(&log.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
