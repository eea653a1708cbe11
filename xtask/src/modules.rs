//! `cargo xtask modules`: which source file of a crate names items of which other, and the
//! cycles among them. A file depends on another when its code names an item defined there
//! (through `use` or a path); a `mod.rs` or `lib.rs` that only declares and re-exports is a
//! facade, and naming an item through it counts as naming the file that defines the item.
//! Test code (`#[cfg(test)]` items and modules) is left out: a test may use any module.
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use syn::visit::Visit;

/// One module of the crate: a file, or a `mod name { ... }` inside one.
struct Module {
    /// Path from the crate root, e.g. `["ops", "cpu"]`.
    path: Vec<String>,
    /// The file that holds it (index into `Crate::files`).
    file: usize,
    children: HashMap<String, usize>,
    /// Names of the items defined here (functions, types, traits, consts, macros...).
    items: HashSet<String>,
    /// Every `use` of an item of this crate, public or not: name -> absolute path.
    imports: HashMap<String, Vec<String>>,
    /// `use path::*`: absolute paths.
    globs: Vec<Vec<String>>,
    /// Whether the glob is re-exported.
    reexported_globs: Vec<bool>,
    /// Every path the module's code names (absolute), with the line it is on.
    references: Vec<(Vec<String>, usize)>,
}

/// A crate's modules and the files they live in.
pub struct Crate {
    /// Relative to the crate's `src` folder.
    files: Vec<PathBuf>,
    modules: Vec<Module>,
}

/// `a -> b`: a file of the crate names an item of another, first at `line` of `a`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Edge {
    pub from: PathBuf,
    pub to: PathBuf,
    pub line: usize,
    pub named: String,
}

impl Crate {
    /// Parses the crate whose root is `src/lib.rs` (or `src/main.rs`) under `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let src = dir.join("src");
        let root = ["lib.rs", "main.rs"]
            .iter()
            .map(|f| src.join(f))
            .find(|p| p.exists())
            .with_context(|| format!("{} has no src/lib.rs or src/main.rs", dir.display()))?;
        let mut krate = Crate {
            files: Vec::new(),
            modules: Vec::new(),
        };
        krate.read_file(&src, &root, Vec::new())?;
        Ok(krate)
    }

    fn read_file(&mut self, src: &Path, file: &Path, path: Vec<String>) -> Result<usize> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let ast = syn::parse_file(&text).with_context(|| format!("parsing {}", file.display()))?;
        let rel = file.strip_prefix(src).unwrap_or(file).to_path_buf();
        self.files.push(rel);
        let file_index = self.files.len() - 1;
        // Where `mod x;` of this file looks for x: beside lib.rs/main.rs/mod.rs, else in a
        // folder named after the file.
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let dir = if path.is_empty() || name == "mod.rs" {
            file.parent().unwrap_or(src).to_path_buf()
        } else {
            file.with_extension("")
        };
        self.read_items(src, &dir, file_index, path, &ast.items)
    }

    fn read_items(
        &mut self,
        src: &Path,
        dir: &Path,
        file: usize,
        path: Vec<String>,
        items: &[syn::Item],
    ) -> Result<usize> {
        let index = self.modules.len();
        self.modules.push(Module {
            path: path.clone(),
            file,
            children: HashMap::new(),
            items: HashSet::new(),
            imports: HashMap::new(),
            globs: Vec::new(),
            reexported_globs: Vec::new(),
            references: Vec::new(),
        });
        let mut collector = Collector {
            module: &path,
            references: Vec::new(),
            imports: Vec::new(),
            items: HashSet::new(),
        };
        for item in items.iter().filter(|i| !is_test_only(i)) {
            collector.visit_item(item);
        }
        let Collector {
            references,
            imports,
            items: names,
            ..
        } = collector;
        for item in items.iter().filter(|i| !is_test_only(i)) {
            let syn::Item::Mod(m) = item else { continue };
            let name = m.ident.to_string();
            let mut child_path = path.clone();
            child_path.push(name.clone());
            let child = match &m.content {
                Some((_, inner)) => {
                    self.read_items(src, &dir.join(&name), file, child_path, inner)?
                }
                None => {
                    let candidates = [
                        dir.join(format!("{name}.rs")),
                        dir.join(&name).join("mod.rs"),
                    ];
                    let Some(found) = candidates.iter().find(|p| p.exists()) else {
                        bail!(
                            "`mod {name};` in {}: neither {} nor {} exists",
                            self.files[file].display(),
                            candidates[0].display(),
                            candidates[1].display()
                        );
                    };
                    self.read_file(src, found, child_path)?
                }
            };
            self.modules[index].children.insert(name, child);
        }
        let module = &mut self.modules[index];
        module.items = names;
        module.references = references;
        for import in imports {
            // Absolute within the crate; imports from other crates are not dependencies here.
            let path = match import.path.first().map(String::as_str) {
                Some("crate") => import.path[1..].to_vec(),
                Some(first)
                    if module.children.contains_key(first) || module.items.contains(first) =>
                {
                    let mut full = module.path.clone();
                    full.extend(import.path);
                    full
                }
                _ => continue,
            };
            match import.name {
                Some(name) => {
                    module.imports.insert(name, path);
                }
                None => {
                    module.globs.push(path);
                    module.reexported_globs.push(import.public);
                }
            }
        }
        Ok(index)
    }

    /// Resolves paths that start at a module's own names (children, imports) to absolute
    /// ones; paths into other crates come back as `None`.
    fn absolute(&self, module: usize, path: &[String]) -> Option<Vec<String>> {
        let m = &self.modules[module];
        let first = path.first()?;
        match first.as_str() {
            // Made absolute while collecting.
            "crate" => Some(path[1..].to_vec()),
            _ => {
                if m.children.contains_key(first) || m.items.contains(first) {
                    let mut full = m.path.clone();
                    full.extend_from_slice(path);
                    Some(full)
                } else if let Some(target) = m.imports.get(first) {
                    let mut full = target.clone();
                    full.extend_from_slice(&path[1..]);
                    Some(full)
                } else {
                    None
                }
            }
        }
    }

    /// The module that defines what the absolute `path` names; `strict`: `None` unless the
    /// name is found there (for globs).
    fn defining_module(&self, path: &[String], strict: bool, depth: usize) -> Option<usize> {
        if depth > 16 {
            return None;
        }
        let mut m = 0;
        let mut i = 0;
        while i < path.len() {
            match self.modules[m].children.get(&path[i]) {
                Some(&child) => {
                    m = child;
                    i += 1;
                }
                None => break,
            }
        }
        if i == path.len() {
            return Some(m);
        }
        let module = &self.modules[m];
        let name = &path[i];
        if module.items.contains(name) {
            return Some(m);
        }
        if let Some(target) = module.imports.get(name) {
            // A name a module imports for its own use is still that module's dependency;
            // through a re-export it is the defining module's.
            let mut full = target.clone();
            full.extend_from_slice(&path[i + 1..]);
            if let Some(found) = self.defining_module(&full, true, depth + 1) {
                return Some(found);
            }
        }
        for (glob, public) in module.globs.iter().zip(&module.reexported_globs) {
            if !public {
                continue;
            }
            let mut full = glob.clone();
            full.extend_from_slice(&path[i..]);
            if let Some(found) = self.defining_module(&full, true, depth + 1) {
                return Some(found);
            }
        }
        (!strict).then_some(m)
    }

    /// Every dependency between two different files, once per pair (the first reference).
    pub fn edges(&self) -> Vec<Edge> {
        let mut first: BTreeMap<(usize, usize), (usize, String)> = BTreeMap::new();
        for (index, module) in self.modules.iter().enumerate() {
            for (path, line) in &module.references {
                let Some(full) = self.absolute(index, path) else {
                    continue;
                };
                let Some(target) = self.defining_module(&full, false, 0) else {
                    continue;
                };
                let (from, to) = (module.file, self.modules[target].file);
                if from != to {
                    first
                        .entry((from, to))
                        .or_insert_with(|| (*line, full.join("::")));
                }
            }
        }
        first
            .into_iter()
            .map(|((from, to), (line, named))| Edge {
                from: self.files[from].clone(),
                to: self.files[to].clone(),
                line,
                named,
            })
            .collect()
    }

    /// Groups of files that depend on each other in a circle (strongly connected components
    /// of more than one file), each with the edges inside it.
    pub fn cycles(&self) -> Vec<Vec<Edge>> {
        let edges = self.edges();
        let nodes: BTreeSet<&PathBuf> = self.files.iter().collect();
        let mut out: BTreeMap<&PathBuf, Vec<&PathBuf>> = BTreeMap::new();
        for e in &edges {
            out.entry(&e.from).or_default().push(&e.to);
        }
        // A file's component: the files it reaches that also reach it (a few dozen files, so
        // a search from each is cheap).
        let reach = |start: &PathBuf| -> BTreeSet<PathBuf> {
            let mut seen = BTreeSet::new();
            let mut stack = vec![start.clone()];
            while let Some(n) = stack.pop() {
                if seen.insert(n.clone()) {
                    for next in out.get(&n).into_iter().flatten() {
                        stack.push((*next).clone());
                    }
                }
            }
            seen
        };
        let reached: BTreeMap<&PathBuf, BTreeSet<PathBuf>> =
            nodes.iter().map(|n| (*n, reach(n))).collect();
        let mut groups: Vec<BTreeSet<PathBuf>> = Vec::new();
        for n in &nodes {
            if groups.iter().any(|g| g.contains(*n)) {
                continue;
            }
            let group: BTreeSet<PathBuf> = reached[n]
                .iter()
                .filter(|m| reached[m].contains(*n))
                .cloned()
                .collect();
            if group.len() > 1 {
                groups.push(group);
            }
        }
        groups
            .into_iter()
            .map(|g| {
                edges
                    .iter()
                    .filter(|e| g.contains(&e.from) && g.contains(&e.to))
                    .cloned()
                    .collect()
            })
            .collect()
    }
}

/// One `use`: `name` `None` for a glob.
struct Import {
    name: Option<String>,
    path: Vec<String>,
    public: bool,
}

/// Gathers one module's definitions, imports and named paths (not those of inline child
/// modules, which are modules of their own).
struct Collector<'a> {
    module: &'a [String],
    references: Vec<(Vec<String>, usize)>,
    imports: Vec<Import>,
    items: HashSet<String>,
}

impl Collector<'_> {
    /// `path` with `crate`, `self` and `super` made absolute (`crate` first); other paths as
    /// they are, resolved later against the module's own names.
    fn normalise(&self, path: Vec<String>) -> Vec<String> {
        let mut base: Vec<String> = self.module.to_vec();
        let mut rest = path.as_slice();
        match rest.first().map(String::as_str) {
            Some("self") => rest = &rest[1..],
            Some("super") => {
                while rest.first().map(String::as_str) == Some("super") {
                    base.pop();
                    rest = &rest[1..];
                }
            }
            _ => return path,
        }
        let mut full = vec!["crate".to_string()];
        full.extend(base);
        full.extend_from_slice(rest);
        full
    }

    fn add_use(&mut self, tree: &syn::UseTree, prefix: Vec<String>, public: bool, line: usize) {
        match tree {
            syn::UseTree::Path(p) => {
                let mut prefix = prefix;
                prefix.push(p.ident.to_string());
                self.add_use(&p.tree, prefix, public, line);
            }
            syn::UseTree::Name(n) => {
                let mut path = prefix;
                let name = n.ident.to_string();
                if name != "self" {
                    path.push(name.clone());
                }
                let name = path.last().cloned().unwrap_or(name);
                self.import(Some(name), path, public, line);
            }
            syn::UseTree::Rename(r) => {
                let mut path = prefix;
                path.push(r.ident.to_string());
                self.import(Some(r.rename.to_string()), path, public, line);
            }
            syn::UseTree::Glob(_) => self.import(None, prefix, public, line),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.add_use(t, prefix.clone(), public, line);
                }
            }
        }
    }

    fn import(&mut self, name: Option<String>, path: Vec<String>, public: bool, line: usize) {
        let path = self.normalise(path);
        self.references.push((path.clone(), line));
        self.imports.push(Import { name, path, public });
    }
}

/// Whether `item` is compiled for tests only (`#[cfg(test)]`).
fn is_test_only(item: &syn::Item) -> bool {
    let attrs = match item {
        syn::Item::Mod(i) => &i.attrs,
        syn::Item::Fn(i) => &i.attrs,
        syn::Item::Use(i) => &i.attrs,
        syn::Item::Impl(i) => &i.attrs,
        syn::Item::Struct(i) => &i.attrs,
        syn::Item::Const(i) => &i.attrs,
        _ => return false,
    };
    attrs.iter().any(|a| {
        a.path().is_ident("cfg") && a.parse_args::<syn::Ident>().is_ok_and(|arg| arg == "test")
    })
}

fn line_of(span: proc_macro2::Span) -> usize {
    span.start().line
}

impl<'ast> Visit<'ast> for Collector<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let name = match item {
            syn::Item::Const(i) => Some(&i.ident),
            syn::Item::Enum(i) => Some(&i.ident),
            syn::Item::Fn(i) => Some(&i.sig.ident),
            syn::Item::Macro(i) => i.ident.as_ref(),
            syn::Item::Static(i) => Some(&i.ident),
            syn::Item::Struct(i) => Some(&i.ident),
            syn::Item::Trait(i) => Some(&i.ident),
            syn::Item::TraitAlias(i) => Some(&i.ident),
            syn::Item::Type(i) => Some(&i.ident),
            syn::Item::Union(i) => Some(&i.ident),
            _ => None,
        };
        if let Some(name) = name {
            self.items.insert(name.to_string());
        }
        match item {
            // A module of its own.
            syn::Item::Mod(_) => {}
            syn::Item::Use(u) => {
                let public = !matches!(u.vis, syn::Visibility::Inherited);
                let line = line_of(u.use_token.span);
                self.add_use(&u.tree, Vec::new(), public, line);
            }
            _ => syn::visit::visit_item(self, item),
        }
    }

    /// `pub(crate)`, `pub(super)`, `pub(in path)` name a scope, not a dependency.
    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        if let Some(first) = path.segments.first() {
            let line = line_of(first.ident.span());
            let normalised = self.normalise(segments);
            self.references.push((normalised, line));
        }
        syn::visit::visit_path(self, path);
    }
}

/// The crates `cargo xtask modules` checks: every library of `crates/`.
pub fn crate_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .context("listing crates/")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("Cargo.toml").exists())
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// Prints every crate's cycles; fails if there is one.
pub fn check(root: &Path) -> Result<()> {
    let mut found = 0;
    for dir in crate_dirs(root)? {
        let krate = Crate::read(&dir)?;
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        for cycle in krate.cycles() {
            found += 1;
            println!("{name}: files that name each other's items in a circle:");
            for e in cycle {
                println!(
                    "  {} -> {}  (line {}: {})",
                    e.from.display(),
                    e.to.display(),
                    e.line,
                    e.named
                );
            }
        }
    }
    if found > 0 {
        bail!("{found} module cycle(s)");
    }
    println!("no module cycles in crates/");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, files: &[(&str, &str)]) {
        for (name, text) in files {
            let path = dir.join("src").join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-modules-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_cycle_through_a_facade_is_found_and_a_chain_is_not() {
        let dir = scratch("cycle");
        write(
            &dir,
            &[
                ("lib.rs", "pub mod a;\npub mod b;\npub use a::A;\n"),
                ("a.rs", "pub struct A;\npub fn f() { crate::b::g(); }\n"),
                ("b.rs", "use crate::A;\npub fn g() {}\npub fn h(_: A) {}\n"),
            ],
        );
        let krate = Crate::read(&dir).unwrap();
        let edges = krate.edges();
        // b names A through the root's re-export: the edge goes to a.rs, not lib.rs.
        assert!(edges
            .iter()
            .any(|e| e.from == Path::new("b.rs") && e.to == Path::new("a.rs")));
        assert!(!edges.iter().any(|e| e.to == Path::new("lib.rs")));
        let cycles = krate.cycles();
        assert_eq!(cycles.len(), 1);
        assert_eq!(cycles[0].len(), 2);

        write(&dir, &[("a.rs", "pub struct A;\n")]);
        assert!(Crate::read(&dir).unwrap().cycles().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn super_and_folder_modules_resolve() {
        let dir = scratch("super");
        write(
            &dir,
            &[
                ("lib.rs", "mod ops;\n"),
                ("ops/mod.rs", "mod cpu;\nmod float;\npub use cpu::run;\n"),
                ("ops/float.rs", "pub trait Float {}\n"),
                (
                    "ops/cpu.rs",
                    "use super::float::Float;\npub fn run<T: Float>() { super::helper(); }\n",
                ),
            ],
        );
        // `super::helper` is not defined anywhere: it counts as the facade's own item.
        let cycles = Crate::read(&dir).unwrap().cycles();
        assert_eq!(cycles.len(), 1);
        let files: BTreeSet<_> = cycles[0].iter().map(|e| e.from.clone()).collect();
        assert!(files.contains(Path::new("ops/cpu.rs")));
        assert!(files.contains(Path::new("ops/mod.rs")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The workspace's own crates: `cargo xtask test` runs this.
    #[test]
    fn no_module_cycles_in_the_workspace() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        check(root).unwrap();
    }
}
