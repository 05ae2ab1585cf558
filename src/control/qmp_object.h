/*
 * QMP object-add / object-del (qmp_object.c): QEMU's tls-creds-x509,
 * tls-creds-psk and authz-simple objects, made in m's registry through the
 * public calls of include/livemig/tls.h.  The handlers keep no state: m
 * outlives the server (lm_qmp's contract), so nothing is freed here.
 */
#ifndef CONTROL_QMP_OBJECT_H
#define CONTROL_QMP_OBJECT_H

#include "livemig/qmp.h"

int qmp_object_register(lm_qmp *q, lm_mig *m, lm_error *err);

#endif
