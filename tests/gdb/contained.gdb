# Scenario gdb-contained: the debugged guest touches a port it was not granted while gdb
# lets it run; the hypervisor stops it as any other guest, and gdb hears it exited (1).
set language c
echo GDB: connected\n
continue
echo GDB: after continue\n
