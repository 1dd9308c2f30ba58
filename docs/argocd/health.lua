-- Argo CD health check for dcmdp.io/DCMDPRun (see docs/kubernetes.md, "GitOps").
-- Maps the operator's status (phase, conditions, observedGeneration) to Argo CD's health:
--   no status yet / status of an older generation  -> Progressing
--   Pending, or Running but not Ready               -> Progressing
--   Running and Ready                                -> Healthy
--   Succeeded                                        -> Healthy
--   Suspended (spec.suspend: true)                   -> Suspended
--   Failed, or a spec the operator refuses           -> Degraded
local hs = {}

local function condition(status, ctype)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function progress(status)
  local parts = {}
  if status.step ~= nil and status.totalSteps ~= nil then
    table.insert(parts, "step " .. tostring(status.step) .. "/" .. tostring(status.totalSteps))
  end
  if status.reward ~= nil then
    table.insert(parts, string.format("reward %.3g", status.reward))
  end
  if status.probDiffMean ~= nil then
    table.insert(parts, string.format("discrepancy %.3g", status.probDiffMean))
  end
  if status.lambdas ~= nil then
    table.insert(parts, "lambda " .. status.lambdas)
  end
  return table.concat(parts, ", ")
end

local function with_progress(message, status)
  local p = progress(status)
  if p == "" then
    return message or ""
  end
  if message == nil or message == "" then
    return p
  end
  return message .. " (" .. p .. ")"
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the dcmdp operator"
  return hs
end

local status = obj.status
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local ready = condition(status, "Ready")
-- A spec the operator cannot carry out waits for a person, not for time: Degraded.
if ready ~= nil and ready.status == "False" and
   (ready.reason == "SpecChangeRefused" or ready.reason == "InvalidSpec" or ready.reason == "ChildConflict" or
       ready.reason == "ChildRejected") then
  hs.status = "Degraded"
  hs.message = ready.message or ready.reason
  return hs
end

local phase = status.phase
if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = with_progress(status.message or "the run failed", status)
elseif phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = with_progress(status.message or "the run finished", status)
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = with_progress(status.message or "suspended", status)
elseif phase == "Running" and ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = with_progress(status.message, status)
elseif phase == "Running" or phase == "Pending" then
  hs.status = "Progressing"
  local why = status.message
  if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
    why = ready.message
  end
  hs.message = with_progress(why, status)
else
  hs.status = "Unknown"
  hs.message = "unknown phase " .. tostring(phase)
end
return hs
