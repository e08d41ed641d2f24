# The scripted session of scenario gdb-session (tests/emulator.toml), run by
# `cargo xtask test` as `gdb -batch` after `target remote` to the debuggee guest's COM2.
# Each `echo` marks a step the scenario's gdb_expect looks for. The language is C so
# that the no_mangle symbols are found by their plain names.
set language c
echo GDB: connected\n
info registers rip rsp
break *nk_gdb_target
continue
echo GDB: at the breakpoint\n
info registers rip
set $rdi = 41
stepi
echo GDB: stepped\n
print $rax
info registers rip
x/7c &NK_GDB_MARK
delete
# Ctrl-C: a timer sends gdb SIGINT while the guest waits for NK_GDB_WORD; gdb sends the
# remote 0x03 and the guest stops wherever it is.
python import os, signal, threading; threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
continue
echo GDB: interrupted\n
set {unsigned long}&NK_GDB_WORD = 0x1234
x/1gx &NK_GDB_WORD
detach
echo GDB: detached\n
