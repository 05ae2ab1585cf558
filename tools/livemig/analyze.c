/*
 * `livemig analyze FILE [--json] [--offset N] [--extract-ram DIR]`: what is in a
 * migration file (livemig's, QEMU's, or mapped-ram).
 *
 * All the parsing is the library's (livemig/analyze.h); this file only
 * presents the result: a human-readable report on stdout, or with --json
 * the library's JSON document.  When the file cannot be fully understood
 * the report still shows everything up to the problem, the problem goes to
 * stderr ("livemig analyze: FILE: <what> at byte offset N") and the exit
 * status is 1.  A file understood to its end that does not hold a whole
 * migration (lm_analysis.complete) exits 3, saying what is missing.  Usage
 * errors exit 2.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "livemig/analyze.h"

int cmd_analyze(int argc, char **argv);

static void analyze_usage(FILE *f)
{
    fprintf(f,
        "Usage: livemig analyze FILE [--json] [--offset N] [--extract-ram DIR]\n"
        "\n"
        "Describe a migration stream file: a livemig save (migrate file:...), a\n"
        "QEMU stream (migrate \"exec:cat > FILE\") or a mapped-ram file.  Prints the\n"
        "header, the configuration, every section with its byte range [start, end),\n"
        "the commands, the EOF offset, the VMDESCRIPTION, each RAM block's page\n"
        "counts and the totals.\n"
        "\n"
        "Options:\n"
        "  --json               print one JSON document instead of the report\n"
        "  --offset N           the stream starts at byte N of the file (as with\n"
        "                       the URI file:PATH,offset=N)\n"
        "  --extract-ram DIR    write each RAM block's memory to DIR/<name>, with\n"
        "                       '/' in the block name replaced by '_'; the images\n"
        "                       are exactly the block's size, unsent pages zero\n"
        "  -h, --help           show this help\n"
        "\n"
        "Exit status: 0 the whole file was understood (and extracted) and holds a\n"
        "complete migration; 1 it was not understood (the error names the byte\n"
        "offset); 2 usage; 3 understood, but not a whole migration: stderr says\n"
        "what is missing (pages, a device's state, the END of a section...).\n");
}

static void print_counts_header(void)
{
    printf("  %-28s %14s %9s %9s %9s %9s %10s %7s\n", "block", "size", "pages", "present",
           "zero", "normal", "compressed", "xbzrle");
}

static void print_counts(const char *name, uint64_t size, const lm_an_counts *k)
{
    printf("  %-28s %14llu %9llu %9llu %9llu %9llu %10llu %7llu\n", name,
           (unsigned long long)size, (unsigned long long)k->pages,
           (unsigned long long)k->pages_present, (unsigned long long)k->zero_pages,
           (unsigned long long)k->normal_pages, (unsigned long long)k->compressed_pages,
           (unsigned long long)k->xbzrle_pages);
}

static void print_report(const char *path, const lm_analysis *a, const char *dir)
{
    printf("file            %s (%llu bytes)\n", path, (unsigned long long)a->file_size);
    if (a->stream_offset)
        printf("stream offset   %llu\n", (unsigned long long)a->stream_offset);
    if (!a->header_ok) {
        printf("header          not a QEVM stream\n");
        return;
    }
    printf("header          magic 0x%08x \"QEVM\", version %u\n", a->magic, a->version);
    if (a->has_config) {
        printf("configuration   machine \"%s\" at byte %llu\n", a->machine,
               (unsigned long long)a->config_offset);
        for (size_t i = 0; i < a->nconfig_subsections; i++) {
            const lm_an_subsection *s = &a->config_subsections[i];
            printf("  subsection    %s version %u [%llu, %llu)\n", s->name, s->version,
                   (unsigned long long)s->start, (unsigned long long)s->end);
        }
        if (a->ncapabilities) {
            printf("  capabilities ");
            for (size_t i = 0; i < a->ncapabilities; i++)
                printf(" %s", a->capabilities[i]);
            printf("\n");
        }
    } else {
        printf("configuration   none\n");
    }
    printf("format          %s, page size %llu\n",
           a->mapped_ram ? "mapped-ram (pages at fixed offsets)" : "stream (page records)",
           (unsigned long long)a->page_size);

    printf("sections        %zu\n", a->nsections);
    if (a->nsections)
        printf("  %-5s %5s  %-32s %8s %7s  %-24s %s\n", "type", "id", "idstr", "instance",
               "version", "bytes [start, end)", "parsed by");
    for (size_t i = 0; i < a->nsections; i++) {
        const lm_an_section *s = &a->sections[i];
        char range[48];
        snprintf(range, sizeof(range), "[%llu, %llu)", (unsigned long long)s->start,
                 (unsigned long long)s->end);
        printf("  %-5s %5u  %-32s %8u %7u  %-24s %s\n", lm_an_section_type_name(s->type),
               s->section_id, s->idstr, s->instance_id, s->version_id, range,
               s->parsed_by == LM_AN_PARSED_RAM ? "ram" : "vmdesc");
    }
    printf("commands        %zu\n", a->ncommands);
    for (size_t i = 0; i < a->ncommands; i++)
        printf("  %-20s cmd %u, %u bytes, at byte %llu\n",
               lm_an_command_name(a->commands[i].cmd), a->commands[i].cmd, a->commands[i].len,
               (unsigned long long)a->commands[i].offset);
    if (a->has_eof)
        printf("EOF             at byte %llu\n", (unsigned long long)a->eof_offset);
    else
        printf("EOF             not reached\n");
    if (a->has_vmdesc)
        printf("VMDESCRIPTION   at byte %llu, %u bytes of JSON\n",
               (unsigned long long)a->vmdesc_offset, a->vmdesc_len);
    else
        printf("VMDESCRIPTION   none\n");
    if (a->trailing_bytes)
        printf("trailing        %llu bytes after the stream\n",
               (unsigned long long)a->trailing_bytes);

    printf("RAM blocks      %zu, MEM_SIZE total %llu bytes\n", a->nblocks,
           (unsigned long long)a->ram_total);
    if (a->nblocks) {
        uint64_t size = 0;
        print_counts_header();
        for (size_t i = 0; i < a->nblocks; i++) {
            print_counts(a->blocks[i].idstr, a->blocks[i].size, &a->blocks[i].counts);
            size += a->blocks[i].size;
        }
        print_counts("total", size, &a->totals);
        for (size_t i = 0; i < a->nblocks; i++) {
            const lm_an_block *b = &a->blocks[i];
            if (b->mapped_ram)
                printf("  %s: mapped-ram header at %llu, bitmap at %llu, pages at %llu\n",
                       b->idstr, (unsigned long long)b->header_offset,
                       (unsigned long long)b->bitmap_offset,
                       (unsigned long long)b->pages_offset);
            if (b->has_mr_addr)
                printf("  %s: guest-physical address 0x%llx\n", b->idstr,
                       (unsigned long long)b->mr_addr);
        }
    }
    printf("page records    %llu", (unsigned long long)a->page_records);
    if (a->multifd_flushes)
        printf(", %llu MULTIFD_FLUSH", (unsigned long long)a->multifd_flushes);
    printf("\n");
    if (!a->error.code)
        printf("complete        %s%s\n", a->complete ? "yes: a whole migration" : "no: ",
               a->complete ? "" : a->missing);
    if (a->extracted)
        for (size_t i = 0; i < a->nblocks; i++)
            printf("extracted       %s/%s (%llu bytes)\n", dir, a->blocks[i].file_name,
                   (unsigned long long)a->blocks[i].size);
}

int cmd_analyze(int argc, char **argv)
{
    static const struct option opts[] = {
        { "json", no_argument, NULL, 'j' },
        { "extract-ram", required_argument, NULL, 'x' },
        { "offset", required_argument, NULL, 'o' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    lm_analyze_opts aopts = { .extract_dir = NULL };
    lm_analysis *a = NULL;
    lm_error err = { 0 };
    bool json = false;
    int c, rc;

    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'j':
            json = true;
            break;
        case 'x':
            aopts.extract_dir = optarg;
            break;
        case 'o': {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(optarg, &end, 0);
            if (errno || end == optarg || *end || optarg[0] == '-') {
                fprintf(stderr, "livemig analyze: --offset: '%s' is not a byte offset\n",
                        optarg);
                return 2;
            }
            aopts.offset = v;
            break;
        }
        case 'h':
            analyze_usage(stdout);
            return 0;
        default:
            analyze_usage(stderr);
            return 2;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "livemig analyze: expected exactly one FILE\n\n");
        analyze_usage(stderr);
        return 2;
    }
    rc = lm_analyze_file(argv[optind], &aopts, &a, &err);
    if (json) {
        char *doc = lm_analysis_to_json(a);
        if (!doc) {
            fprintf(stderr, "livemig analyze: out of memory formatting JSON\n");
            lm_analysis_free(a);
            return 1;
        }
        printf("%s\n", doc);
        free(doc);
    } else {
        print_report(argv[optind], a, aopts.extract_dir);
    }
    fflush(stdout);
    if (rc)
        fprintf(stderr, "livemig analyze: %s: %s\n", argv[optind], err.msg);
    else if (!a->complete)
        fprintf(stderr, "livemig analyze: %s: not a complete migration: %s\n", argv[optind],
                a->missing);
    c = rc ? 1 : a->complete ? 0 : 3;
    lm_analysis_free(a);
    return c;
}
