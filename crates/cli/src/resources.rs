//! apply / create / replace / delete / get / patch / label / validate, calicoctl style.
//! Every multi-document write validates every document (and checks it against the store) before
//! writing anything.

use std::path::Path;

use anyhow::{Context, bail};
use gingham_api::network::BGPConfigurationSpec;
use gingham_api::object::check_update;
use gingham_api::validate::parse_asn;
use gingham_api::{Document, Kind, Object, parse_documents_in};
use gingham_store::ResourceStore;
use gingham_store::resources::{BatchOp, ResourceError, WriteMode};
use serde_json::Value;

use crate::FileArgs;
use crate::output::{self, Format, TableContext};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Apply,
    Create { skip_exists: bool },
    Replace,
}

impl Mode {
    fn past(self) -> &'static str {
        match self {
            Mode::Apply => "applied",
            Mode::Create { .. } => "created",
            Mode::Replace => "replaced",
        }
    }
    fn verb(self) -> &'static str {
        match self {
            Mode::Apply => "apply",
            Mode::Create { .. } => "create",
            Mode::Replace => "replace",
        }
    }
}

/// The .yaml/.yml/.json files of `dir` (and, with `recursive`, its subdirectories) in name
/// order. Symlinked directories are followed once: a directory already visited (a loop) is
/// skipped.
fn collect_files(
    dir: &Path,
    recursive: bool,
    out: &mut Vec<std::path::PathBuf>,
    seen: &mut std::collections::BTreeSet<(u64, u64)>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).with_context(|| format!("cannot read directory {}", dir.display()))?;
    if !seen.insert((meta.dev(), meta.ino())) {
        return Ok(());
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            if recursive {
                collect_files(&p, recursive, out, seen)?;
            }
        } else if p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "yaml" | "yml" | "json")) {
            out.push(p);
        }
    }
    Ok(())
}

/// (name to show in messages, text) for every input.
fn read_inputs(f: &FileArgs) -> anyhow::Result<Vec<(String, String)>> {
    let mut inputs = Vec::new();
    for name in &f.files {
        if name == "-" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("cannot read standard input")?;
            inputs.push(("<stdin>".to_string(), text));
            continue;
        }
        let path = Path::new(name);
        let mut files = Vec::new();
        if path.is_dir() {
            collect_files(path, f.recursive, &mut files, &mut Default::default())?;
            if files.is_empty() {
                bail!("{name}: no .yaml, .yml or .json files in this directory");
            }
        } else {
            files.push(path.to_path_buf());
        }
        for p in files {
            let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
            inputs.push((p.display().to_string(), text));
        }
    }
    Ok(inputs)
}

/// Parse and validate every document of every input; report all errors at once.
fn read_documents(f: &FileArgs) -> anyhow::Result<Vec<Document>> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (source, text) in read_inputs(f)? {
        match parse_documents_in(&source, &text, f.namespace.as_deref()) {
            Ok(d) => docs.extend(d),
            Err(e) => errors.extend(e),
        }
    }
    if !errors.is_empty() {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        bail!("{}\nnothing was written: fix the errors above and try again", lines.join("\n"));
    }
    if docs.is_empty() {
        bail!("no resources found in {}", f.files.join(", "));
    }
    // One resource named twice: which version should win? Neither: refuse.
    let mut seen: std::collections::BTreeMap<(String, Option<String>, String), &Document> = Default::default();
    let mut dups = Vec::new();
    for d in &docs {
        let o = &d.object;
        let key = (o.kind.clone(), o.namespace().map(str::to_string), o.name().to_string());
        if let Some(first) = seen.get(&key) {
            dups.push(format!("{}: the same resource as {}:{}", describe(d), first.source, first.index));
        } else {
            seen.insert(key, d);
        }
    }
    if !dups.is_empty() {
        bail!("{}\nnothing was written: fix the errors above and try again", dups.join("\n"));
    }
    Ok(docs)
}

fn describe(doc: &Document) -> String {
    let o = &doc.object;
    let kind = o.kind().map(|k| k.to_string()).unwrap_or_else(|| o.kind.clone());
    match o.namespace() {
        Some(ns) => format!("{}: document {}: {kind} {ns}/{}", doc.source, doc.index, o.name()),
        None => format!("{}: document {}: {kind} {}", doc.source, doc.index, o.name()),
    }
}

fn store_err(e: ResourceError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

fn success(verb: &str, objects: &[&Object]) -> String {
    let kinds: std::collections::BTreeSet<&str> = objects.iter().map(|o| o.kind.as_str()).collect();
    if kinds.len() == 1 {
        format!("Successfully {verb} {} '{}' resource(s)", objects.len(), objects[0].kind)
    } else {
        format!("Successfully {verb} {} resource(s)", objects.len())
    }
}

pub fn validate(f: &FileArgs) -> anyhow::Result<()> {
    let docs = read_documents(f)?;
    let objs: Vec<&Object> = docs.iter().map(|d| &d.object).collect();
    println!("{}", success("validated", &objs));
    Ok(())
}

/// IPPools may not overlap each other (as in Calico): checked among the documents and against
/// every stored pool of another name.
fn pool_overlaps(docs: &[&Document], stored: &[Object]) -> Vec<String> {
    let cidr = |o: &Object| o.spec["cidr"].as_str().and_then(|c| c.parse::<ipnet::IpNet>().ok());
    let overlap = |a: ipnet::IpNet, b: ipnet::IpNet| a.contains(&b.network()) || b.contains(&a.network());
    let mut problems = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        let Some(mine) = cidr(&d.object) else { continue };
        for other in stored.iter().filter(|o| o.name() != d.object.name()) {
            if let Some(theirs) = cidr(other).filter(|c| overlap(mine, *c)) {
                problems.push(format!(
                    "{}: spec.cidr: {mine} overlaps IPPool {} ({theirs})",
                    describe(d),
                    other.name()
                ));
            }
        }
        for e in &docs[..i] {
            if let Some(theirs) = cidr(&e.object).filter(|c| overlap(mine, *c)) {
                problems.push(format!("{}: spec.cidr: {mine} overlaps {} ({theirs})", describe(d), describe(e)));
            }
        }
    }
    problems
}

/// After a batch failed part-way: what each document's resource holds now.
async fn report_partial(store: &ResourceStore, docs: &[&Document]) -> String {
    let mut stored = Vec::new();
    let mut not = Vec::new();
    for d in docs {
        let o = &d.object;
        let same = match o.kind() {
            Some(k) => store
                .get(k, o.namespace(), o.name())
                .await
                .ok()
                .flatten()
                .is_some_and(|cur| cur.spec == o.spec && cur.metadata.labels == o.metadata.labels),
            None => false,
        };
        if same { stored.push(describe(d)) } else { not.push(describe(d)) }
    }
    format!(
        "stored now ({}): {}\nnot stored ({}): {}",
        stored.len(),
        if stored.is_empty() { "none".into() } else { stored.join(", ") },
        not.len(),
        if not.is_empty() { "none".into() } else { not.join(", ") }
    )
}

pub async fn apply(store: &ResourceStore, f: &FileArgs, mode: Mode) -> anyhow::Result<()> {
    let docs = read_documents(f)?;
    // Check every document against what is stored before writing any.
    let mut problems = Vec::new();
    let mut todo: Vec<&Document> = Vec::new();
    for doc in &docs {
        let o = &doc.object;
        let kind = o.kind().context("normalised objects have a known kind")?;
        let pinned = match o.metadata.resource_version.as_deref().filter(|v| !v.is_empty()) {
            None => None,
            Some(v) => match v.parse::<i64>() {
                Ok(r) => Some(r),
                Err(_) => {
                    problems
                        .push(format!("{}: metadata.resourceVersion: {v:?} is not a revision number", describe(doc)));
                    continue;
                }
            },
        };
        // A policy the agents could not compile would be enforced closed: refuse it here.
        if gingham_policy::load::handles(kind) {
            if let Err(e) = gingham_policy::load::check(o) {
                problems.push(format!("{}: document {}: {e}", doc.source, doc.index));
            }
        }
        let current = store.get(kind, o.namespace(), o.name()).await.map_err(store_err)?;
        match (mode, &current) {
            (Mode::Create { skip_exists: true }, Some(_)) => continue,
            (Mode::Create { .. }, Some(_)) => {
                problems.push(format!("{}: already exists (use apply or replace, or --skip-exists)", describe(doc)))
            }
            (Mode::Replace, None) => problems.push(format!("{}: does not exist (use create or apply)", describe(doc))),
            (_, None) if pinned.is_some() => problems
                .push(format!("{}: metadata.resourceVersion is given but the resource does not exist", describe(doc))),
            (_, Some(cur)) => {
                let rev = cur.metadata.resource_version.as_deref().and_then(|r| r.parse::<i64>().ok());
                if let Some(p) = pinned.filter(|p| Some(*p) != rev) {
                    problems.push(format!(
                        "{}: metadata.resourceVersion: {p} is not the stored version ({}): it was changed by someone else since it was read",
                        describe(doc),
                        rev.unwrap_or_default()
                    ));
                }
                problems.extend(check_update(cur, o).iter().map(|e| format!("{}: {e}", describe(doc))));
            }
            _ => {}
        }
        todo.push(doc);
    }
    let pools: Vec<&Document> = todo.iter().copied().filter(|d| d.object.kind() == Some(Kind::IPPool)).collect();
    if !pools.is_empty() {
        problems.extend(pool_overlaps(&pools, &store.list(Kind::IPPool, None).await.map_err(store_err)?));
    }
    if !problems.is_empty() {
        bail!("{}\nnothing was written: fix the errors above and try again", problems.join("\n"));
    }
    if todo.is_empty() {
        println!("No resources {}: all {} already exist", mode.past(), docs.len());
        return Ok(());
    }
    let write_mode = match mode {
        Mode::Apply => WriteMode::Apply,
        Mode::Create { .. } => WriteMode::Create,
        Mode::Replace => WriteMode::Replace,
    };
    let ops: Vec<BatchOp> = todo.iter().map(|d| BatchOp::Write(d.object.clone(), write_mode)).collect();
    if let Err(e) = store.write_batch(&ops).await {
        let about = e.op.and_then(|i| todo.get(i)).map(|d| format!("{}: ", describe(d))).unwrap_or_default();
        if e.written == 0 {
            bail!(
                "Failed to {} '{}' resource: {about}{}\nnothing was written",
                mode.verb(),
                todo[0].object.kind,
                e.error
            );
        }
        bail!(
            "Partial success: {} the first {} out of {} resources (in whole transactions); then failed: {about}{}\n{}",
            mode.past(),
            e.written,
            todo.len(),
            e.error,
            report_partial(store, &todo).await
        );
    }
    for doc in &todo {
        if let Some(from) = &doc.mapped_from {
            eprintln!("note: {} (from {from}) was written as {} {}", doc.source, doc.object.kind, doc.object.name());
        }
    }
    let done: Vec<&Object> = todo.iter().map(|d| &d.object).collect();
    println!("{}", success(mode.past(), &done));
    if todo.iter().any(|d| d.object.kind() == Some(Kind::IPAMConfiguration)) {
        let client = gingham_ipam::IpamClient::new(store.datastore().clone());
        client.mirror_config().await.map_err(|e| {
            anyhow::anyhow!(
                "IPAMConfiguration written, but mirroring it to {} failed: {e}",
                gingham_ipam::client::CONFIG_KEY
            )
        })?;
    }
    Ok(())
}

pub fn resolve_kind(name: &str) -> anyhow::Result<Kind> {
    Kind::from_cli(name).ok_or_else(|| {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.cli_name()).collect();
        anyhow::anyhow!("unknown resource type {name:?}; known types: {}", known.join(", "))
    })
}

fn namespace_for(kind: Kind, ns: Option<&str>) -> Option<String> {
    kind.namespaced().then(|| ns.unwrap_or("default").to_string())
}

/// Delete every named resource or none (one transaction; missing ones are an error unless
/// `skip_missing`).
async fn delete_all(
    store: &ResourceStore,
    targets: Vec<(Kind, Option<String>, String, String)>,
    skip_missing: bool,
) -> anyhow::Result<()> {
    let mut ops = Vec::new();
    let mut labels = Vec::new();
    let mut missing = Vec::new();
    let kinds: Vec<Kind> = targets.iter().map(|t| t.0).collect();
    for (kind, ns, name, label) in targets {
        if store.get(kind, ns.as_deref(), &name).await.map_err(store_err)?.is_none() {
            if !skip_missing {
                missing.push(format!("{label}: resource does not exist: {kind}({name})"));
            }
            continue;
        }
        ops.push(BatchOp::Delete { kind, namespace: ns, name });
        labels.push(label);
    }
    if !missing.is_empty() {
        bail!("{}\nnothing was deleted", missing.join("\n"));
    }
    match store.write_batch(&ops).await {
        Ok(deleted) => {
            if deleted.is_empty() {
                let kinds: std::collections::BTreeSet<&str> = kinds.iter().map(|k| k.kind_name()).collect();
                match kinds.iter().next().filter(|_| kinds.len() == 1) {
                    Some(k) => println!("Successfully deleted 0 '{k}' resource(s)"),
                    None => println!("Successfully deleted 0 resource(s)"),
                }
            } else {
                println!("{}", success("deleted", &deleted.iter().collect::<Vec<_>>()));
            }
            if kinds.contains(&Kind::IPPool) {
                release_pool_blocks(store).await?;
            }
            // As calicoctl: a deleted node's endpoints, addresses and blocks go with it.
            for op in &ops {
                if let BatchOp::Delete { kind: Kind::Node, name, .. } = op {
                    let client = gingham_ipam::IpamClient::new(store.datastore().clone());
                    let c = gingham_controllers::cleanup_node(&client, name).await.map_err(|e| {
                        anyhow::anyhow!("node {name} is deleted, but removing its traces failed: {e} (`gingham controllers run` finishes it, or `gingham ipam check` shows what is left)")
                    })?;
                    println!(
                        "Removed node {name}'s traces: {} endpoints, {} address handles, {} blocks{}",
                        c.endpoints,
                        c.handles.len(),
                        c.blocks_deleted.len(),
                        if c.blocks_kept.is_empty() {
                            String::new()
                        } else {
                            format!(
                                " ({} more hold other nodes' addresses: kept without an owner until they empty)",
                                c.blocks_kept.len()
                            )
                        }
                    );
                }
            }
            Ok(())
        }
        Err(e) => {
            let about = e.op.and_then(|i| labels.get(i)).map(|l| format!("{l}: ")).unwrap_or_default();
            if e.written == 0 {
                bail!("Failed to delete: {about}{}\nnothing was deleted", e.error);
            }
            bail!(
                "Partial success: deleted the first {} out of {} resources; then failed: {about}{}",
                e.written,
                ops.len(),
                e.error
            )
        }
    }
}

/// A deleted pool's blocks lose their affinities (Calico's ReleasePoolAffinities): empty ones
/// go now, the rest once their last address is released.
async fn release_pool_blocks(store: &ResourceStore) -> anyhow::Result<()> {
    let client = gingham_ipam::IpamClient::new(store.datastore().clone());
    let released = client.release_blocks_outside_pools().await.map_err(|e| {
        anyhow::anyhow!(
            "the pool is deleted, but releasing its blocks failed: {e} (run the delete again, or `gingham ipam check`)"
        )
    })?;
    let (gone, kept): (Vec<_>, Vec<_>) = released.iter().partition(|(_, deleted)| *deleted);
    if !released.is_empty() {
        println!(
            "Released the deleted pool's blocks: {} removed{}",
            gone.len(),
            if kept.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} still in use ({}) go when their addresses are released",
                    kept.len(),
                    kept.iter().map(|(c, _)| c.to_string()).collect::<Vec<_>>().join(", ")
                )
            }
        );
    }
    Ok(())
}

pub async fn delete_named(
    store: &ResourceStore,
    kind: &str,
    names: &[String],
    ns: Option<&str>,
    skip_missing: bool,
) -> anyhow::Result<()> {
    let kind = resolve_kind(kind)?;
    if names.is_empty() {
        bail!("name the {kind} resource(s) to delete");
    }
    let ns = namespace_for(kind, ns);
    let targets = names.iter().map(|n| (kind, ns.clone(), n.clone(), format!("{kind} {n}"))).collect();
    delete_all(store, targets, skip_missing).await
}

pub async fn delete_files(store: &ResourceStore, f: &FileArgs, skip_missing: bool) -> anyhow::Result<()> {
    let docs = read_documents(f)?;
    let mut targets = Vec::new();
    for doc in &docs {
        let o = &doc.object;
        let kind = o.kind().context("normalised objects have a known kind")?;
        targets.push((kind, o.namespace().map(str::to_string), o.name().to_string(), describe(doc)));
    }
    delete_all(store, targets, skip_missing).await
}

pub async fn get(
    store: &ResourceStore,
    kind: &str,
    names: &[String],
    ns: Option<&str>,
    all_ns: bool,
    format: Format,
) -> anyhow::Result<()> {
    let kind = resolve_kind(kind)?;
    let ns = namespace_for(kind, ns);
    let mut objects = Vec::new();
    let mut missing = Vec::new();
    if names.is_empty() {
        objects = store.list(kind, if all_ns { None } else { ns.as_deref() }).await.map_err(store_err)?;
    } else {
        for n in names {
            match store.get(kind, ns.as_deref(), n).await.map_err(store_err)? {
                Some(o) => objects.push(o),
                None => missing.push(format!("resource does not exist: {kind}({n})")),
            }
        }
    }
    let text = match format {
        Format::Ps | Format::Wide => {
            let mut ctx = TableContext::default();
            if kind == Kind::Node && format == Format::Wide {
                if let Some(cfg) = store.get(Kind::BGPConfiguration, None, "default").await.map_err(store_err)? {
                    let spec: BGPConfigurationSpec = cfg.spec_as().unwrap_or_default();
                    ctx.default_asn = spec.as_number.as_ref().and_then(|a| parse_asn(a).ok());
                }
            }
            let (mut header, mut rows) = output::columns(kind, format == Format::Wide, &objects, &ctx);
            if kind.namespaced() && all_ns {
                header.insert(0, "NAMESPACE");
                for (row, o) in rows.iter_mut().zip(&objects) {
                    row.insert(0, o.namespace().unwrap_or_default().to_string());
                }
            }
            if objects.is_empty() && !missing.is_empty() {
                String::new()
            } else {
                format!("{}\n", output::table(&header, &rows))
            }
        }
        Format::Yaml | Format::Json if objects.is_empty() && !missing.is_empty() => String::new(),
        Format::Yaml | Format::Json => {
            output::render(&output::document(kind, &objects, names.len() != 1, None), format)
        }
    };
    print!("{text}");
    if !missing.is_empty() {
        bail!("{}", missing.join("\n"));
    }
    Ok(())
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Re-validate a modified object and write it with compare-and-swap on the revision it was read at.
async fn write_back(store: &ResourceStore, kind: Kind, original: &Object, value: Value) -> anyhow::Result<Object> {
    let subject = format!("{kind} {}", original.name());
    for (field, want) in [
        ("/apiVersion", Value::String(original.api_version.clone())),
        ("/kind", Value::String(original.kind.clone())),
        ("/metadata/name", Value::String(original.metadata.name.clone())),
    ] {
        if value.pointer(field) != Some(&want) {
            bail!("{subject}: {}: cannot be changed", field.trim_start_matches('/').replace('/', "."));
        }
    }
    if value.pointer("/metadata/namespace")
        != original.metadata.namespace.as_ref().map(|n| Value::String(n.clone())).as_ref()
    {
        bail!("{subject}: metadata.namespace: cannot be changed");
    }
    let mut obj = kind.normalize(&value).map_err(|errs| {
        anyhow::anyhow!("{}", errs.iter().map(|e| format!("{subject}: {e}")).collect::<Vec<_>>().join("\n"))
    })?;
    obj.metadata.resource_version = original.metadata.resource_version.clone();
    store.update(obj).await.map_err(store_err)
}

pub async fn patch(store: &ResourceStore, kind: &str, name: &str, ns: Option<&str>, patch: &str) -> anyhow::Result<()> {
    let kind = resolve_kind(kind)?;
    let ns = namespace_for(kind, ns);
    let patch: Value =
        serde_saphyr::from_str(patch).map_err(|e| anyhow::anyhow!("the patch is not valid JSON or YAML: {e}"))?;
    if !patch.is_object() {
        bail!("the patch must be a JSON object, e.g. '{{\"spec\":{{\"disabled\":true}}}}'");
    }
    let current = store
        .get(kind, ns.as_deref(), name)
        .await
        .map_err(store_err)?
        .ok_or_else(|| anyhow::anyhow!("resource does not exist: {kind}({name})"))?;
    // A resourceVersion in the patch pins the write to that version, as calicoctl does.
    let mut expected = current.clone();
    if let Some(rv) = patch.pointer("/metadata/resourceVersion") {
        let rv = rv.as_str().map(str::to_string).unwrap_or_else(|| rv.to_string());
        if rv.parse::<i64>().is_err() {
            bail!("{kind} {name}: metadata.resourceVersion: {rv:?} is not a revision number");
        }
        if Some(rv.as_str()) != current.metadata.resource_version.as_deref() {
            bail!(
                "{kind} {name}: metadata.resourceVersion: {rv} is not the stored version ({}): it was changed by someone else since it was read; nothing was written",
                current.metadata.resource_version.as_deref().unwrap_or("?")
            );
        }
        expected.metadata.resource_version = Some(rv);
    }
    let mut value = serde_json::to_value(&current)?;
    merge_patch(&mut value, &patch);
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    write_back(store, kind, &expected, value).await?;
    println!("Successfully patched 1 '{}' resource", kind.kind_name());
    if kind == Kind::IPAMConfiguration {
        gingham_ipam::IpamClient::new(store.datastore().clone())
            .mirror_config()
            .await
            .map_err(|e| anyhow::anyhow!("IPAMConfiguration patched, but mirroring it failed: {e}"))?;
    }
    Ok(())
}

pub async fn label(
    store: &ResourceStore,
    kind: &str,
    name: &str,
    ns: Option<&str>,
    label: &str,
    overwrite: bool,
    remove: bool,
) -> anyhow::Result<()> {
    let kind = resolve_kind(kind)?;
    let ns = namespace_for(kind, ns);
    let current = store
        .get(kind, ns.as_deref(), name)
        .await
        .map_err(store_err)?
        .ok_or_else(|| anyhow::anyhow!("resource does not exist: {kind}({name})"))?;
    let mut obj = current.clone();
    let message = if remove || label.ends_with('-') && !label.contains('=') {
        let key = label.trim_end_matches('-');
        if obj.metadata.labels.remove(key).is_none() {
            bail!("{kind} {name} has no label {key:?}");
        }
        format!("Successfully removed label {key} from {} {name}", kind.cli_name())
    } else {
        let Some((key, value)) = label.split_once('=') else {
            bail!("label {label:?}: use key=value to set, key- or --remove key to remove");
        };
        let verb = match obj.metadata.labels.get(key) {
            Some(old) if old == value => "updated",
            Some(old) if !overwrite => {
                bail!("{kind} {name} already has label {key}={old}; use --overwrite to change it")
            }
            Some(_) => "updated",
            None => "set",
        };
        obj.metadata.labels.insert(key.to_string(), value.to_string());
        format!("Successfully {verb} label {key} on {} {name}", kind.cli_name())
    };
    let mut value = serde_json::to_value(&obj)?;
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    write_back(store, kind, &current, value).await?;
    println!("{message}");
    Ok(())
}
