/* print_cmdline (Multiboot v1): EBX = the information structure; prints its command line
 * (flags bit 2, pointer at offset 16) and keeps its address in mb_cmdline. */
.code32
.section .text, "ax"
print_cmdline:
    test dword ptr [ebx], 4
    jz .Lno_cmdline
    mov esi, [ebx + 16]
    mov [mb_cmdline], esi
    call puts
.Lno_cmdline:
    ret
.code64
