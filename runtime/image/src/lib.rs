//! The Debian image builder behind `beemesh image build` and `beemesh image configure`
//! (DESIGN.md section 8; docs/images.md).
//!
//! - [`spec`]: the image spec (`images/node.toml`), parsed with located diagnostics;
//! - [`lock`]: the lock file (`images/node.lock`): exact package versions and digests;
//! - [`build`]: the build steps, each driving one external tool;
//! - [`configure`]: writing a host's files into an image's `BEEMESH` partition (mtools);
//! - [`gpt`]: just enough GPT reading to find partitions in an image file;
//! - [`tools`]: the external tools, their Debian packages, and running them.

pub mod build;
pub mod configure;
pub mod gpt;
pub mod lock;
pub mod progress;
pub mod rootfs_files;
pub mod spec;
pub mod tools;

pub use build::{BuildOptions, BuildReport, build};
pub use configure::{ConfigureOptions, Configured, configure};
pub use spec::{ImageSpec, LoadedSpec};
