/* print_cmdline (Multiboot2): EBX = the information structure; walks its 8-aligned tags
 * from EBX + 8 to the end tag and prints the command-line tag's (type 1) string. */
.code32
.section .text, "ax"
print_cmdline:
    lea edi, [ebx + 8]
.Ltag:
    mov eax, [edi]
    test eax, eax
    jz .Ltags_end
    cmp eax, 1
    jne .Lnext_tag
    lea esi, [edi + 8]
    call puts
.Lnext_tag:
    mov eax, [edi + 4]
    add eax, 7
    and eax, -8
    add edi, eax
    jmp .Ltag
.Ltags_end:
    ret
.code64
