//! Generates the node-to-node data request service from proto/graph.proto
//! (protoc is installed by scripts/deps.sh, as for etcd-client).

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/graph.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/graph.proto"], &["proto"])
}
