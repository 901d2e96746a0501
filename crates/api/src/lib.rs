//! gingham's resource model: Calico's projectcalico.org/v3 kinds plus networking.k8s.io/v1
//! NetworkPolicy and v1 Namespace, with Calico's defaults, validation that names field paths,
//! and Calico's selector language.

pub mod document;
pub mod enums;
pub mod k8s;
pub mod network;
pub mod object;
pub mod policy;
pub mod selector;
pub mod validate;

pub use document::{Document, DocumentError, parse_documents, parse_documents_in};
pub use object::{Kind, Object, ObjectMeta};
pub use selector::Selector;
pub use validate::FieldError;
