//! The supervisor on its own, for programs that embed
//! `eretes_exec::ProcessHandler` without calling
//! `eretes_exec::supervisor::run_if_invoked` (and for this crate's tests):
//! point `ExecConfig::supervisor` at it with `SupervisorProgram::binary`.

fn main() {
    std::process::exit(eretes_exec::supervisor::main(std::env::args_os().skip(1)));
}
