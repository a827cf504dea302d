//! The store conformance suite, unchanged, against a real etcd (the one
//! `scripts/test.sh` starts; see `eretes_etcd::testing`).

use eretes_etcd::testing::connect_test_etcd;

eretes_store::conformance_tests! {
    store: connect_test_etcd().await,
    attr: #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
}
