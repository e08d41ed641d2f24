/* print_cmdline (Multiboot v1): EBX = the information structure; prints its command line
 * (flags bit 2, pointer at offset 16). */
.code32
.section .text, "ax"
print_cmdline:
    test dword ptr [ebx], 4
    jz .Lno_cmdline
    mov esi, [ebx + 16]
    call puts
.Lno_cmdline:
    ret
.code64
