/*
 * `livemig`: the command-line front end of the library.
 *
 *   livemig guest    a self-verifying demo guest serving QMP (guestcmd.c)
 *   livemig migrate  drive a migration of a running source (migrate.c)
 *   livemig demo     source + destination + migration + check (demo.c)
 *   livemig vm       a minimal KVM VMM serving QMP (vmcmd.c; when built with KVM)
 *
 * main() only dispatches: each command parses its own options and returns
 * the exit status.  Usage errors exit 2 everywhere.  SIGPIPE is ignored
 * process-wide so a peer that goes away is an EPIPE error with a message
 * (on a socket or an exec: pipe), never a silent death.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "commands.h"

int cmd_analyze(int argc, char **argv);   /* analyze.c */

static const struct {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *help;
} commands[] = {
    { "guest", cmd_guest, "run a self-verifying demo guest with a QMP socket" },
    { "migrate", cmd_migrate, "migrate a running source guest over QMP, showing progress" },
    { "demo", cmd_demo, "migrate a demo guest between two child processes and verify it" },
    { "analyze", cmd_analyze, "describe a migration file; --json, --extract-ram DIR" },
#ifdef LIVEMIG_HAVE_KVM
    { "vm", cmd_vm, "run a minimal KVM virtual machine with a QMP socket" },
#endif
};

#define NCOMMANDS (sizeof(commands) / sizeof(commands[0]))

static void usage(FILE *f)
{
    fprintf(f, "Usage: livemig COMMAND [options]\n\nCommands:\n");
    for (size_t i = 0; i < NCOMMANDS; i++)
        fprintf(f, "  %-9s %s\n", commands[i].name, commands[i].help);
    fprintf(f,
        "\n"
        "Run 'livemig COMMAND --help' for the options of a command.\n"
        "\n"
        "Examples:\n"
        "  livemig demo --mem 1G --dirty-rate 20000\n"
        "  livemig analyze /tmp/saved.mig --extract-ram /tmp/ram\n"
        "  livemig guest --mem 1G --dirty-rate 50000 --qmp unix:/tmp/src.qmp &\n"
        "  livemig guest --mem 1G --incoming tcp:127.0.0.1:4444 --qmp unix:/tmp/dst.qmp &\n"
        "  livemig migrate --qmp /tmp/src.qmp --cap auto-converge=on tcp:127.0.0.1:4444\n");
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    for (size_t i = 0; i < NCOMMANDS; i++) {
        if (!strcmp(argv[1], commands[i].name)) {
            /* getopt prefixes its messages with argv[0]: "livemig guest: ..." */
            char name[32];
            snprintf(name, sizeof(name), "livemig %s", commands[i].name);
            argv[1] = name;
            return commands[i].fn(argc - 1, argv + 1);
        }
    }
    fprintf(stderr, "livemig: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
