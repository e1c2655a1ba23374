//! The JSON log format (`--log-format json`): one flat object per line, every key once.
//!
//! tracing-subscriber's own JSON format nests the event's fields under `fields` and the span
//! context under `span`/`spans`, and writes a field named like one it already wrote (an event
//! field called `message` beside the event's message) twice, so a log pipeline keeps only one
//! of them. [`FlatJson`] writes `timestamp`, `level`, `target` and `message`, then the fields
//! of the enclosing spans from the outermost in (so an RPC's `request_id`, `trace_id`,
//! `method` and `principal` are on each of its lines), then the event's fields; an inner
//! value replaces an outer one of the same name, and a field that would replace one of the
//! four fixed keys is written as `field_<name>` instead.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Keys every line has; fields never overwrite them.
const FIXED: [&str; 4] = ["timestamp", "level", "target", "message"];

/// See the module documentation. Use with [`tracing_subscriber::fmt::format::JsonFields`]
/// as the field formatter, so span fields are stored as JSON.
pub struct FlatJson;

fn insert(map: &mut Map<String, Value>, key: &str, value: Value) {
    if FIXED.contains(&key) {
        map.insert(format!("field_{key}"), value);
    } else {
        map.insert(key.to_owned(), value);
    }
}

/// Flattens anything nested (not expected from our fields) into its JSON text.
fn flat(value: Value) -> Value {
    match value {
        Value::Object(_) | Value::Array(_) => Value::String(value.to_string()),
        v => v,
    }
}

struct Fields<'a> {
    map: &'a mut Map<String, Value>,
    message: Option<String>,
}

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        if field.name() == "message" && self.message.is_none() {
            self.message = Some(match value {
                Value::String(s) => s,
                v => v.to_string(),
            });
        } else {
            insert(self.map, field.name(), value);
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::from(format!("{value:?}")));
    }
}

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut map = Map::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                let Some(fields) = ext.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(&fields.fields) {
                    for (k, v) in obj {
                        insert(&mut map, &k, flat(v));
                    }
                }
            }
        }
        let mut visitor = Fields {
            map: &mut map,
            message: None,
        };
        event.record(&mut visitor);
        let message = visitor.message.take().unwrap_or_default();
        map.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        map.insert("level".into(), meta.level().as_str().into());
        map.insert("target".into(), meta.target().into());
        map.insert("message".into(), message.into());
        let line = serde_json::to_string(&map).map_err(|_| fmt::Error)?;
        writeln!(writer, "{line}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn fields_are_flat_and_never_replace_the_message() {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(FlatJson)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!("request", request_id = "00ff", method = "outer");
            let _o = outer.enter();
            let inner = tracing::info_span!(
                "rpc",
                method = "Tokenize",
                principal = tracing::field::Empty
            );
            inner.record("principal", "checkout");
            let _i = inner.enter();
            tracing::info!(
                code = "InvalidArgument",
                message = "bad pan",
                level = 3,
                "rpc failed"
            );
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["message"], "rpc failed", "{text}");
        assert_eq!(v["field_message"], "bad pan", "{text}");
        assert_eq!(v["field_level"], 3, "{text}");
        assert_eq!(v["level"], "INFO", "{text}");
        assert_eq!(v["request_id"], "00ff", "{text}");
        assert_eq!(v["method"], "Tokenize", "{text}");
        assert_eq!(v["principal"], "checkout", "{text}");
        assert_eq!(v["code"], "InvalidArgument", "{text}");
        assert!(v.as_object().unwrap().values().all(|v| !v.is_object()));
        assert_eq!(text.matches("\"message\"").count(), 1, "{text}");
    }
}
