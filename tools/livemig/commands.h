/*
 * The subcommands of `livemig`.  Each takes its own argv (argv[0] is the
 * command name), parses its options with getopt_long, and returns the
 * process exit status: 0 success, 1 failure, 2 usage error (3 is reserved
 * for a guest whose arrival check found damaged pages).
 */
#ifndef LIVEMIG_TOOL_COMMANDS_H
#define LIVEMIG_TOOL_COMMANDS_H

int cmd_guest(int argc, char **argv);
int cmd_migrate(int argc, char **argv);
int cmd_demo(int argc, char **argv);
int cmd_vm(int argc, char **argv);          /* vmcmd.c, with KVM only */

#endif
