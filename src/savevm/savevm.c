/*
 * Writing the main stream's framing; see savevm.h for the grammar.
 */
#include <string.h>

#include "integrity/integrity.h"
#include "savevm/savevm.h"

void savevm_put_header(lm_stream *s, bool mapped_ram, bool ignore_shared, bool integrity)
{
    lm_put_be32(s, WIRE_QEVM_MAGIC);
    lm_put_be32(s, WIRE_QEVM_VERSION);
    lm_put_u8(s, WIRE_VM_CONFIGURATION);
    lm_put_be32(s, (uint32_t)strlen(SAVEVM_MACHINE_NAME));
    lm_put_buffer(s, SAVEVM_MACHINE_NAME, strlen(SAVEVM_MACHINE_NAME));
    if (mapped_ram || ignore_shared || integrity) {
        lm_put_u8(s, WIRE_VM_SUBSECTION);
        stream_put_counted(s, "configuration/capabilities");
        lm_put_be32(s, 1);          /* subsection version */
        lm_put_be32(s, (uint32_t)mapped_ram + (uint32_t)ignore_shared + (uint32_t)integrity);
        /* QEMU lists the validated capabilities in its table's order */
        if (ignore_shared)
            stream_put_counted(s, "x-ignore-shared");
        if (mapped_ram)
            stream_put_counted(s, "mapped-ram");
        if (integrity)
            stream_put_counted(s, INTEGRITY_CAP);
    }
}

void savevm_section_header(lm_stream *s, uint8_t type, uint32_t id, const char *idstr,
                           uint32_t instance, uint32_t version)
{
    lm_put_u8(s, type);
    lm_put_be32(s, id);
    if (type == WIRE_VM_SECTION_START || type == WIRE_VM_SECTION_FULL) {
        stream_put_counted(s, idstr);
        lm_put_be32(s, instance);
        lm_put_be32(s, version);
    }
}

void savevm_section_footer(lm_stream *s, uint32_t id)
{
    lm_put_u8(s, WIRE_VM_SECTION_FOOTER);
    lm_put_be32(s, id);
}

void savevm_put_command(lm_stream *s, uint16_t cmd, uint16_t len, const void *data)
{
    lm_put_u8(s, WIRE_VM_COMMAND);
    lm_put_be16(s, cmd);
    lm_put_be16(s, len);
    if (len)
        lm_put_buffer(s, data, len);
}

void savevm_put_eof(lm_stream *s)
{
    lm_put_u8(s, WIRE_VM_EOF);
}
