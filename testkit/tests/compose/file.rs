//! Reading `compose.yaml` as Compose does: YAML with its merge keys (`<<`) resolved, and
//! Compose's interpolation of `$` in values.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
};

use serde_json::Value;

pub fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

pub fn read_repo_file(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// `compose.yaml` with every merge key resolved, as JSON.
pub fn compose() -> Value {
    let mut yaml: serde_norway::Value =
        serde_norway::from_str(&read_repo_file("compose.yaml")).expect("compose.yaml is YAML");
    resolve_merges(&mut yaml);
    serde_json::to_value(yaml).expect("compose.yaml has string keys only")
}

/// YAML's merge keys, recursively: a mapping takes the keys it lacks from each mapping under
/// its `<<` (earlier ones first), and a merged mapping's own `<<` is resolved before it is
/// merged. (serde_norway's `apply_merge` leaves that inner `<<` in place.)
fn resolve_merges(value: &mut serde_norway::Value) {
    use serde_norway::Value as Yaml;
    match value {
        Yaml::Mapping(map) => {
            if let Some(merge) = map.remove("<<") {
                let sources = match merge {
                    Yaml::Sequence(sources) => sources,
                    source => vec![source],
                };
                for mut source in sources {
                    resolve_merges(&mut source);
                    let Yaml::Mapping(source) = source else {
                        panic!("<< merges mappings only, not {source:?}");
                    };
                    for (key, value) in source {
                        if !map.contains_key(&key) {
                            map.insert(key, value);
                        }
                    }
                }
            }
            map.values_mut().for_each(resolve_merges);
        }
        Yaml::Sequence(items) => items.iter_mut().for_each(resolve_merges),
        Yaml::Tagged(tagged) => resolve_merges(&mut tagged.value),
        _ => {}
    }
}

/// The services, by name.
pub fn services(compose: &Value) -> &serde_json::Map<String, Value> {
    compose["services"]
        .as_object()
        .expect("compose.yaml has services")
}

/// A scalar of the file as Compose reads it (a number or a boolean as its text).
pub fn scalar(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("expected a scalar, found {other}"),
    }
}

/// A service's `environment` (map or `NAME=value` list), values as written (not interpolated).
pub fn environment(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Null => BTreeMap::new(),
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), scalar(v))).collect(),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                let item = scalar(item);
                let (name, value) = item.split_once('=').unwrap_or((&item, ""));
                (name.to_owned(), value.to_owned())
            })
            .collect(),
        other => panic!("environment is neither a map nor a list: {other}"),
    }
}

/// A string or list field (`command`, `entrypoint`, a healthcheck's `test`) as a list; a string
/// is returned as one item (Compose would split it like a shell).
pub fn words(value: &Value) -> Vec<String> {
    match value {
        Value::Null => Vec::new(),
        Value::Array(items) => items.iter().map(scalar).collect(),
        other => vec![scalar(other)],
    }
}

/// A service's profiles (none: it always starts).
pub fn profiles(service: &Value) -> Vec<String> {
    words(&service["profiles"])
}

/// A service's `depends_on` (map or list), with each one's condition.
pub fn depends_on(service: &Value) -> Vec<(String, String)> {
    match &service["depends_on"] {
        Value::Null => Vec::new(),
        Value::Array(names) => names
            .iter()
            .map(|name| (scalar(name), "service_started".to_owned()))
            .collect(),
        Value::Object(map) => map
            .iter()
            .map(|(name, spec)| {
                let condition = spec["condition"].as_str().unwrap_or("service_started");
                (name.clone(), condition.to_owned())
            })
            .collect(),
        other => panic!("depends_on is neither a map nor a list: {other}"),
    }
}

/// Compose's interpolation of `text` with the shell's variables `env`: `$$` is a `$`, `$NAME`
/// and `${NAME}` its value (empty when unset), `${NAME:-default}` the default when it is unset
/// or empty, `${NAME-default}` when it is unset. Any other form panics, so that a new one in
/// the file is noticed here rather than read wrong.
pub fn interpolate(text: &str, env: &HashMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(braced) = rest.strip_prefix('{') {
            let end = braced
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {text:?}"));
            let expression = &braced[..end];
            rest = &braced[end + 1..];
            let name_end = expression
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(expression.len());
            let (name, operator) = expression.split_at(name_end);
            let value = env.get(name).copied();
            match (operator.strip_prefix(":-"), operator.strip_prefix('-')) {
                _ if operator.is_empty() => out.push_str(value.unwrap_or("")),
                (Some(default), _) => {
                    out.push_str(value.filter(|v| !v.is_empty()).unwrap_or(default))
                }
                (None, Some(default)) => out.push_str(value.unwrap_or(default)),
                _ => panic!("interpolation this test does not know: ${{{expression}}}"),
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            assert!(
                end > 0,
                "a lone $ in {text:?}: Compose refuses it (write $$)"
            );
            out.push_str(env.get(&rest[..end]).copied().unwrap_or(""));
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

#[test]
fn interpolation_reads_as_compose_does() {
    let env = HashMap::from([("SET", "x"), ("EMPTY", "")]);
    let cases = [
        ("a $$b", "a $b"),
        ("${SET}/$SET/${UNSET}", "x/x/"),
        ("${SET:-d} ${EMPTY:-d} ${UNSET:-d}", "x d d"),
        ("${SET-d} ${EMPTY-d} ${UNSET-d}", "x  d"),
        ("${UNSET:-}", ""),
        ("sh -c 'exec \"$$@\"'", "sh -c 'exec \"$@\"'"),
    ];
    for (text, want) in cases {
        assert_eq!(interpolate(text, &env), want, "{text}");
    }
}
