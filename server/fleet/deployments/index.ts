/** Phased deployments (docs/deployments.md): the model and the orchestrator. */
export * from './model.ts';
export {
  claimDeployments,
  currentRate,
  DeploymentOrchestrator,
  LEASE_MS,
  stepDeployment,
  type OrchestratorOptions,
  type StepOutcome,
} from './orchestrator.ts';
