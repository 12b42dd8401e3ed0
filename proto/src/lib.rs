//! Generated gRPC code for palaver's two internal APIs.
//!
//! The `.proto` files under `proto/proto/` are the contract; this crate only
//! compiles them. [`FILE_DESCRIPTOR_SET`] feeds server reflection so that
//! `grpcurl` can list and call every method without local proto files.

pub mod session {
    pub mod v1 {
        tonic::include_proto!("palaver.session.v1");
    }
}

pub mod inference {
    pub mod v1 {
        tonic::include_proto!("palaver.inference.v1");
    }
}

/// Encoded `FileDescriptorSet` of every palaver proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/palaver_descriptor.bin"));
