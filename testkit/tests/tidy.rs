//! Tidy checks on the crates' sources, as tests (after rust-analyzer's `tidy.rs`): what
//! ARCHITECTURE.md states about the code's shape holds, and stays so.
//!
//! **No module imports one that imports it back.** For each crate (`api`, `worker`, `shared`)
//! the sources are parsed (`syn`) into a graph of modules, one per file: `a/b.rs` and
//! `a/b/mod.rs` are `a::b`, `lib.rs` the root. A module depends on another when its code
//! names it:
//! - a `use` of `crate::…`, `self::…`, `super::…`, or of a child module's name;
//! - any other path that starts so, in code, and in the tokens of macro calls and attribute
//!   arguments (`format!(…, crate::x::f())`, `#[utoipa::path(… body = crate::x::T)]`);
//! - a path names the deepest module it goes through (`crate::a::b::T` is `a::b` when `a/b.rs`
//!   exists, else `a`; `crate::T` is the root).
//!
//! What is not a dependency: `mod x;` (declaring a child is not using it), comments, string
//! literals and doc text, and code under `#[cfg(test)]` (tests may reach anywhere). A child
//! naming its parent (`super::T`) is a dependency like any other, so a parent that re-exports
//! or calls its child while the child takes something from the parent is a cycle: what both
//! share belongs in a third module that both import. A `main.rs` beside a `lib.rs` is a
//! separate crate (it uses the library by name) and is not read.
//!
//! The test fails with every cycle (a strongly connected component of more than one module),
//! its files, and the paths that close it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use syn::{
    Attribute, ImplItem, Item, ItemMod, ItemUse, Macro, Meta, TraitItem, UseTree,
    buffer::{Cursor, TokenBuffer},
    visit::{self, Visit},
};

/// The crates whose modules must not import each other in a cycle.
const CRATES: &[&str] = &["api", "worker", "shared"];

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut report = String::new();
    for name in CRATES {
        let src = root.join(name).join("src");
        let files = sources(&src);
        assert!(!files.is_empty(), "no sources under {}", src.display());
        let files: Vec<(String, String)> = files
            .into_iter()
            .map(|(path, text)| (format!("{name}/src/{path}"), text))
            .collect();
        report.push_str(&cycles_report(name, &files));
    }
    assert!(
        report.is_empty(),
        "modules that import each other (move what they share into a module both import):\n{report}"
    );
}

/// The `.rs` files under `src`, as (path relative to `src`, text), sorted.
fn sources(src: &Path) -> Vec<(String, String)> {
    fn walk(dir: &Path, src: &Path, out: &mut Vec<(String, String)>) {
        let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, src, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text =
                    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let relative: PathBuf = path.strip_prefix(src).expect("under src").into();
                let relative = relative
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((relative, text));
            }
        }
    }
    let mut out = Vec::new();
    walk(src, src, &mut out);
    out.sort();
    out
}

/// A module's path from the crate root (empty: the root).
type ModPath = Vec<String>;

/// The module a file is, from its path under `src/` (`a/b.rs`, `a/b/mod.rs`: `a::b`), or None
/// for a file that is not one of the library's modules (`main.rs` beside `lib.rs`, `bin/`).
fn module_of(relative: &str, has_lib: bool) -> Option<ModPath> {
    let stem = relative.strip_suffix(".rs")?;
    let mut parts: Vec<String> = stem.split('/').map(str::to_owned).collect();
    match parts.as_slice() {
        [only] if only == "lib" => return Some(Vec::new()),
        [only] if only == "main" => return (!has_lib).then(Vec::new),
        [first, ..] if first == "bin" => return None,
        _ => {}
    }
    if parts.last().is_some_and(|last| last == "mod") {
        parts.pop();
    }
    Some(parts)
}

/// One crate's modules and what each one's code names.
struct Graph {
    /// Every file's module, by the file's path (as given).
    files: BTreeMap<String, ModPath>,
    /// Every module, inline ones included, and the file that holds it.
    modules: BTreeMap<ModPath, String>,
    /// Per file, the paths its code names: (the module scope they are written in, the path).
    paths: BTreeMap<String, Vec<(ModPath, Vec<String>)>>,
}

impl Graph {
    /// The graph of one crate's files, `(path, text)` with paths ending in the part under `src/`
    /// (`api/src/a/b.rs`).
    fn of(files: &[(String, String)]) -> Graph {
        let under_src = |path: &str| {
            path.split_once("src/")
                .map_or(path, |(_, rest)| rest)
                .to_owned()
        };
        let has_lib = files.iter().any(|(path, _)| under_src(path) == "lib.rs");
        let mut graph = Graph {
            files: BTreeMap::new(),
            modules: BTreeMap::new(),
            paths: BTreeMap::new(),
        };
        let mut test_only: BTreeSet<ModPath> = BTreeSet::new();
        for (path, text) in files {
            let Some(module) = module_of(&under_src(path), has_lib) else {
                continue;
            };
            let parsed = syn::parse_file(text).unwrap_or_else(|e| panic!("{path}: {e}"));
            let mut collector = Collector {
                scope: module.clone(),
                paths: Vec::new(),
                inline: Vec::new(),
                test_only: Vec::new(),
            };
            collector.visit_file(&parsed);
            graph.modules.insert(module.clone(), path.clone());
            for inline in collector.inline {
                graph.modules.insert(inline, path.clone());
            }
            test_only.extend(collector.test_only);
            graph.files.insert(path.clone(), module);
            graph.paths.insert(path.clone(), collector.paths);
        }
        // Files that only tests compile (`#[cfg(test)] mod tests;`), and what is under them.
        let tested = |module: &ModPath| test_only.iter().any(|t| module.starts_with(t));
        graph.files.retain(|_, module| !tested(module));
        graph.modules.retain(|module, _| !tested(module));
        let files = &graph.files;
        graph.paths.retain(|file, _| files.contains_key(file));
        graph
    }

    /// The absolute path (from the crate root) that `path`, written in module `scope`, names;
    /// None when it leaves the crate (another crate, a local, an item in scope).
    fn absolute(&self, scope: &ModPath, path: &[String]) -> Option<ModPath> {
        let (first, rest) = path.split_first()?;
        match first.as_str() {
            "crate" => Some(rest.to_vec()),
            "self" => Some([scope.as_slice(), rest].concat()),
            "super" => {
                let ups = path.iter().take_while(|s| *s == "super").count();
                let base = scope.get(..scope.len().checked_sub(ups)?)?;
                Some([base, &path[ups..]].concat())
            }
            // A child module, named from its parent (`use reader::X`, `openapi::serve`).
            _ if path.len() > 1 => {
                let child = [scope.as_slice(), std::slice::from_ref(first)].concat();
                self.modules
                    .contains_key(&child)
                    .then(|| [scope.as_slice(), path].concat())
            }
            _ => None,
        }
    }

    /// The file of the deepest module `absolute` goes through.
    fn file_of(&self, absolute: &[String]) -> &str {
        (0..=absolute.len())
            .rev()
            .find_map(|n| self.modules.get(&absolute[..n]))
            .map_or("", String::as_str)
    }

    /// Per file, the other files its code names, each with the first path that names it.
    fn edges(&self) -> BTreeMap<&str, BTreeMap<&str, String>> {
        let mut edges: BTreeMap<&str, BTreeMap<&str, String>> = BTreeMap::new();
        for (file, paths) in &self.paths {
            let out = edges.entry(file.as_str()).or_default();
            for (scope, path) in paths {
                let Some(absolute) = self.absolute(scope, path) else {
                    continue;
                };
                let target = self.file_of(&absolute);
                if target != file && !target.is_empty() {
                    out.entry(target).or_insert_with(|| path.join("::"));
                }
            }
        }
        edges
    }
}

/// Walks one file's syntax: the paths it names, its inline modules, the modules only tests
/// compile.
struct Collector {
    /// The module being read (the file's, then an inline module's inside it).
    scope: ModPath,
    paths: Vec<(ModPath, Vec<String>)>,
    inline: Vec<ModPath>,
    test_only: Vec<ModPath>,
}

impl Collector {
    fn name(&mut self, path: Vec<String>) {
        self.paths.push((self.scope.clone(), path));
    }

    /// The paths in a token stream (a macro's input, an attribute's arguments): runs of
    /// identifiers joined by `::`. Literals are single tokens, so their text is never read.
    fn scan(&mut self, tokens: Cursor) {
        let mut run: Vec<String> = Vec::new();
        let mut joined = false;
        let mut cursor = tokens;
        while !cursor.eof() {
            if let Some((ident, next)) = cursor.ident() {
                if !joined && !run.is_empty() {
                    self.name(std::mem::take(&mut run));
                }
                run.push(ident.to_string());
                joined = false;
                cursor = next;
                continue;
            }
            if let Some((colon, next)) = cursor.punct()
                && colon.as_char() == ':'
                && let Some((second, after)) = next.punct()
                && second.as_char() == ':'
            {
                joined = !run.is_empty();
                cursor = after;
                continue;
            }
            if !run.is_empty() {
                self.name(std::mem::take(&mut run));
            }
            joined = false;
            if let Some((inside, _, _, next)) = cursor.any_group() {
                self.scan(inside);
                cursor = next;
            } else if let Some((_, next)) = cursor.token_tree() {
                cursor = next;
            } else {
                break;
            }
        }
        if !run.is_empty() {
            self.name(run);
        }
    }
}

/// Whether `attrs` hold `#[cfg(test)]` (or a `cfg` that needs `test`, such as
/// `all(test, …)`).
fn is_test(attrs: &[Attribute]) -> bool {
    attrs.iter().any(|attr| {
        let Meta::List(list) = &attr.meta else {
            return false;
        };
        if !list.path.is_ident("cfg") {
            return false;
        }
        let text = list.tokens.to_string();
        let words: Vec<&str> = text
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .collect();
        words.contains(&"test") && !words.contains(&"not")
    })
}

/// The paths a `use` tree names, each in full (`crate::a::{b, c::D}`: `crate::a::b`,
/// `crate::a::c::D`; `self` in a group names the group's path).
fn flatten(tree: &UseTree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match tree {
        UseTree::Path(path) => {
            prefix.push(path.ident.to_string());
            flatten(&path.tree, prefix, out);
            prefix.pop();
        }
        UseTree::Name(name) if name.ident == "self" => out.push(prefix.clone()),
        UseTree::Name(name) => out.push([prefix.as_slice(), &[name.ident.to_string()]].concat()),
        UseTree::Rename(rename) if rename.ident == "self" => out.push(prefix.clone()),
        UseTree::Rename(rename) => {
            out.push([prefix.as_slice(), &[rename.ident.to_string()]].concat());
        }
        UseTree::Glob(_) => out.push(prefix.clone()),
        UseTree::Group(group) => {
            for tree in &group.items {
                flatten(tree, prefix, out);
            }
        }
    }
}

impl<'ast> Visit<'ast> for Collector {
    fn visit_item(&mut self, item: &'ast Item) {
        let attrs: &[Attribute] = match item {
            Item::Const(i) => &i.attrs,
            Item::Enum(i) => &i.attrs,
            Item::ExternCrate(i) => &i.attrs,
            Item::Fn(i) => &i.attrs,
            Item::ForeignMod(i) => &i.attrs,
            Item::Impl(i) => &i.attrs,
            Item::Macro(i) => &i.attrs,
            Item::Mod(i) => &i.attrs,
            Item::Static(i) => &i.attrs,
            Item::Struct(i) => &i.attrs,
            Item::Trait(i) => &i.attrs,
            Item::TraitAlias(i) => &i.attrs,
            Item::Type(i) => &i.attrs,
            Item::Union(i) => &i.attrs,
            Item::Use(i) => &i.attrs,
            _ => &[],
        };
        if is_test(attrs) {
            if let Item::Mod(module) = item {
                self.test_only
                    .push([self.scope.as_slice(), &[module.ident.to_string()]].concat());
            }
            return;
        }
        visit::visit_item(self, item);
    }

    fn visit_impl_item(&mut self, item: &'ast ImplItem) {
        let attrs: &[Attribute] = match item {
            ImplItem::Const(i) => &i.attrs,
            ImplItem::Fn(i) => &i.attrs,
            ImplItem::Type(i) => &i.attrs,
            ImplItem::Macro(i) => &i.attrs,
            _ => &[],
        };
        if !is_test(attrs) {
            visit::visit_impl_item(self, item);
        }
    }

    fn visit_trait_item(&mut self, item: &'ast TraitItem) {
        let attrs: &[Attribute] = match item {
            TraitItem::Const(i) => &i.attrs,
            TraitItem::Fn(i) => &i.attrs,
            TraitItem::Type(i) => &i.attrs,
            TraitItem::Macro(i) => &i.attrs,
            _ => &[],
        };
        if !is_test(attrs) {
            visit::visit_trait_item(self, item);
        }
    }

    fn visit_item_mod(&mut self, module: &'ast ItemMod) {
        // `mod x;` declares a child: no dependency. An inline module is read in its own scope.
        if let Some((_, items)) = &module.content {
            self.scope.push(module.ident.to_string());
            self.inline.push(self.scope.clone());
            for attr in &module.attrs {
                self.visit_attribute(attr);
            }
            for item in items {
                self.visit_item(item);
            }
            self.scope.pop();
        }
    }

    fn visit_item_use(&mut self, item: &'ast ItemUse) {
        let mut paths = Vec::new();
        flatten(&item.tree, &mut Vec::new(), &mut paths);
        for path in paths {
            self.name(path);
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        if path.segments.len() > 1 {
            self.name(path.segments.iter().map(|s| s.ident.to_string()).collect());
        }
        visit::visit_path(self, path);
    }

    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {
        // `pub(crate)`, `pub(super)`, `pub(in crate::a)`: who may see an item, not a use.
    }

    fn visit_macro(&mut self, mac: &'ast Macro) {
        self.visit_path(&mac.path);
        self.scan(TokenBuffer::new2(mac.tokens.clone()).begin());
    }

    fn visit_attribute(&mut self, attr: &'ast Attribute) {
        // Doc text (`#[doc = "…"]`) is a literal; arguments (`#[utoipa::path(…)]`) may name
        // types.
        if let Meta::List(list) = &attr.meta {
            self.scan(TokenBuffer::new2(list.tokens.clone()).begin());
        }
    }
}

/// The strongly connected components of more than one node (Tarjan's algorithm), each sorted,
/// in the order of their first node.
fn cycles<'a>(edges: &BTreeMap<&'a str, BTreeMap<&'a str, String>>) -> Vec<Vec<&'a str>> {
    struct Tarjan<'a, 'e> {
        edges: &'e BTreeMap<&'a str, BTreeMap<&'a str, String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<&'a str>>,
    }
    impl<'a> Tarjan<'a, '_> {
        fn visit(&mut self, node: &'a str) {
            let n = self.index.len();
            self.index.insert(node, n);
            self.low.insert(node, n);
            self.stack.push(node);
            self.on_stack.insert(node);
            let targets: Vec<&'a str> = self
                .edges
                .get(node)
                .map(|out| out.keys().copied().collect())
                .unwrap_or_default();
            for target in targets {
                if !self.index.contains_key(target) {
                    self.visit(target);
                    let low = self.low[node].min(self.low[target]);
                    self.low.insert(node, low);
                } else if self.on_stack.contains(target) {
                    let low = self.low[node].min(self.index[target]);
                    self.low.insert(node, low);
                }
            }
            if self.low[node] == self.index[node] {
                let mut component = Vec::new();
                while let Some(top) = self.stack.pop() {
                    self.on_stack.remove(top);
                    component.push(top);
                    if top == node {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort_unstable();
                    self.found.push(component);
                }
            }
        }
    }
    let mut tarjan = Tarjan {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for &node in edges.keys() {
        if !tarjan.index.contains_key(node) {
            tarjan.visit(node);
        }
    }
    tarjan.found.sort();
    tarjan.found
}

/// A shortest cycle through the files of `component` (a breadth-first search from each),
/// its first file repeated at its end.
fn shortest_cycle<'a>(
    edges: &BTreeMap<&'a str, BTreeMap<&'a str, String>>,
    component: &[&'a str],
) -> Vec<&'a str> {
    let mut best: Vec<&'a str> = Vec::new();
    for &start in component {
        let mut came_from: BTreeMap<&'a str, &'a str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start]);
        'search: while let Some(node) = queue.pop_front() {
            for &next in edges[node].keys() {
                if !component.contains(&next) {
                    continue;
                }
                if next == start {
                    // Back from `node` to `start`, then turned around, and closed.
                    let mut cycle = vec![node];
                    while let Some(&back) = cycle.last().and_then(|last| came_from.get(last)) {
                        cycle.push(back);
                    }
                    cycle.reverse();
                    cycle.push(start);
                    if best.is_empty() || cycle.len() < best.len() {
                        best = cycle;
                    }
                    break 'search;
                }
                if !came_from.contains_key(next) {
                    came_from.insert(next, node);
                    queue.push_back(next);
                }
            }
        }
    }
    best
}

/// The cycles among one crate's files, one paragraph each (empty when there are none).
fn cycles_report(name: &str, files: &[(String, String)]) -> String {
    let graph = Graph::of(files);
    let edges = graph.edges();
    let mut report = String::new();
    for component in cycles(&edges) {
        let _ = writeln!(report, "{name}: {}", component.join(", "));
        let _ = writeln!(
            report,
            "  shortest: {}",
            shortest_cycle(&edges, &component).join(" -> ")
        );
        for &from in &component {
            for (&to, path) in &edges[from] {
                if component.contains(&to) {
                    let _ = writeln!(report, "    {from} -> {to}  ({path})");
                }
            }
        }
    }
    report
}

/// The checker itself, on crates written here.
mod checker {
    use super::cycles_report;

    fn report(files: &[(&str, &str)]) -> String {
        let files: Vec<(String, String)> = files
            .iter()
            .map(|(path, text)| (format!("x/src/{path}"), (*text).to_owned()))
            .collect();
        cycles_report("x", &files)
    }

    #[test]
    fn two_modules_that_name_each_other_are_a_cycle() {
        let out = report(&[
            ("lib.rs", "mod a; mod b;"),
            ("a.rs", "use crate::b::Thing; pub fn f() {}"),
            ("b.rs", "pub struct Thing; fn g() { crate::a::f() }"),
        ]);
        assert_eq!(
            out,
            "x: x/src/a.rs, x/src/b.rs\n  \
             shortest: x/src/a.rs -> x/src/b.rs -> x/src/a.rs\n    \
             x/src/a.rs -> x/src/b.rs  (crate::b::Thing)\n    \
             x/src/b.rs -> x/src/a.rs  (crate::a::f)\n"
        );
    }

    #[test]
    fn declaring_a_child_is_not_importing_it() {
        let out = report(&[
            ("lib.rs", "mod a; pub mod b; pub fn f() {}"),
            ("a.rs", "use crate::f;"),
            ("b/mod.rs", "mod c; pub struct T;"),
            ("b/c.rs", "use super::T;"),
        ]);
        assert_eq!(out, "");
    }

    #[test]
    fn a_parent_that_re_exports_a_child_that_names_it_is_a_cycle() {
        let out = report(&[
            ("lib.rs", "mod m;"),
            ("m/mod.rs", "mod c; pub use self::c::X; pub struct Y;"),
            ("m/c.rs", "use super::Y; pub struct X;"),
        ]);
        assert!(
            out.starts_with("x: x/src/m/c.rs, x/src/m/mod.rs\n"),
            "{out}"
        );
        // The same through a child's bare name and a child's `super::super`.
        let out = report(&[
            ("lib.rs", "mod m; fn f() { m::g() }"),
            ("m/mod.rs", "mod c; pub fn g() { c::h() }"),
            ("m/c.rs", "pub fn h() { super::super::f() }"),
        ]);
        assert!(
            out.contains(
                "shortest: x/src/lib.rs -> x/src/m/mod.rs -> x/src/m/c.rs -> x/src/lib.rs"
            ),
            "{out}"
        );
        assert!(
            out.contains("x/src/lib.rs -> x/src/m/mod.rs  (m::g)"),
            "{out}"
        );
        assert!(
            out.contains("x/src/m/c.rs -> x/src/lib.rs  (super::super::f)"),
            "{out}"
        );
    }

    #[test]
    fn comments_strings_docs_and_tests_name_nothing() {
        let out = report(&[
            ("lib.rs", "mod a; mod b;"),
            (
                "a.rs",
                r#"
                //! See [`crate::b::T`].
                // crate::b::T
                /* crate::b::T */
                const S: &str = "crate::b::T";
                fn f() { println!("{}", "crate::b::T"); }
                #[cfg(test)]
                mod tests { use crate::b::T; }
                #[cfg(test)]
                fn g() { crate::b::h() }
                "#,
            ),
            ("b.rs", "use crate::a::S; pub struct T;"),
        ]);
        assert_eq!(out, "");
    }

    #[test]
    fn macros_and_attribute_arguments_are_read() {
        for a in [
            "fn f() { tracing::info!(x = %crate::b::name(), \"hi\"); }",
            "#[utoipa::path(get, path = \"/\", responses((status = 200, body = crate::b::T)))] fn f() {}",
            "macro_rules! m { () => { $crate::b::name() } }",
        ] {
            let out = report(&[
                ("lib.rs", "mod a; mod b;"),
                ("a.rs", a),
                ("b.rs", "use crate::a::*; pub fn name() {} pub struct T;"),
            ]);
            assert!(out.starts_with("x: x/src/a.rs, x/src/b.rs\n"), "{a}: {out}");
        }
    }

    #[test]
    fn a_path_names_the_deepest_module_it_goes_through() {
        let out = report(&[
            ("lib.rs", "mod a; mod b; pub struct Root;"),
            (
                "a/mod.rs",
                "pub mod inner { pub struct T; } mod c; pub use c::U;",
            ),
            ("a/c.rs", "pub struct U; fn f() -> crate::Root { todo!() }"),
            ("b.rs", "use crate::a::inner::T; use crate::a::U;"),
        ]);
        // b names a (its inline `inner` included), a names c, c names the root: no cycle,
        // since the root only declares its children.
        assert_eq!(out, "");
    }
}
