// Validates Prometheus Operator and KEDA objects with the kubernetes-models packages' validate(),
// the JSON schemas generated from those projects' Go types.
//
//   node --input-type=module -e "$(cat k8s_models.mjs)" OBJECTS.json
//
// run in the directory whose node_modules holds the packages (tests/support/npm, installed by
// scripts/test): code given with -e resolves its imports from the working directory.
// OBJECTS.json is a JSON list of objects; the output is a JSON list of {kind, name, error},
// error null for a valid object. An object no model knows is an error, never a pass.
import { readFileSync } from "node:fs";

const MODELS = {
  "monitoring.coreos.com/v1/ServiceMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
  "monitoring.coreos.com/v1/PodMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor",
  "monitoring.coreos.com/v1/PrometheusRule": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule",
  "keda.sh/v1alpha1/ScaledObject": "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject",
};

const objects = JSON.parse(readFileSync(process.argv[1], "utf8"));
const results = [];
for (const object of objects) {
  const key = `${object.apiVersion}/${object.kind}`;
  let error = null;
  if (!(key in MODELS)) {
    error = `no model for ${key}`;
  } else {
    const Model = (await import(MODELS[key]))[object.kind];
    try {
      new Model(object).validate();
    } catch (e) {
      error = String(e.message || e);
    }
  }
  results.push({ kind: object.kind, name: object.metadata?.name ?? null, error });
}
process.stdout.write(JSON.stringify(results));
