/** Deployments (docs/deployments.md): the model, the orchestrator, and a plain target's deployment. */
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
export {
  activeTargetDeployment,
  closeTargetDeployment,
  openTargetDeployment,
  supersedeTargetDeployment,
} from './target.ts';
